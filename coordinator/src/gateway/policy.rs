//! The gateway policy: its YAML schema (what `--gateway-config` and the etcd key hold) and its
//! validation into a [`Policy`] the request path reads without further checks.
//!
//! Schema (every field documented in `deploy/gateway.example.yaml` and the README):
//!
//! ```yaml
//! admin_key_hashes: [sha256:...]        # keys that may read GET /v1/usage
//! tiers:
//!   <tier>: {weight: 1, route: <target>, limits: {...}}
//! tenants:
//!   <tenant>:
//!     key_hashes: [sha256:...]          # SHA-256 of each API key; never a plain key
//!     tier: <tier>
//!     models: [<target>, ...]           # what it may use; absent: every served model
//!     default_route: <target>
//!     features: {<X-Feature value>: <target>}
//!     experiment: {name: <name>, user_header: x-user-id,
//!                  variants: [{name: a, route: <target>, weight: 50}, ...]}
//!     fallback: <target>                # when the chosen target is unavailable; absent: 503
//!     limits: {requests_per_second, tokens_per_minute, max_concurrent_requests,
//!              max_tokens, max_context_tokens}
//! ```
//!
//! A target names a served model (any `--served-model-name`) or, once they exist, an adapter;
//! targets are not checked against what is served, since adapters come and go at run time: a
//! target that is not available when a request is routed takes the tenant's `fallback`.
//!
//! Invariants after [`Policy::parse`]: every key hash is 64 lowercase hex digits and names one
//! tenant (or admin); every tier named exists; every route and fallback of a tenant is among its
//! `models` when it lists them; experiment weights are positive; limits are positive. Errors
//! name the field (`tenants.acme.tier`).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;

/// Why a policy was refused: the field at fault (a dotted path) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid gateway policy: `{field}`: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

/// The policy file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub admin_key_hashes: Vec<String>,
    #[serde(default)]
    pub tiers: BTreeMap<String, TierSpec>,
    pub tenants: BTreeMap<String, TenantSpec>,
}

/// A plan tier: the fair-share weight of its tenants, the target tier routing picks, and the
/// limits its tenants get unless they set their own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub limits: Limits,
}

/// One tenant as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub key_hashes: Vec<String>,
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub default_route: Option<String>,
    #[serde(default)]
    pub features: BTreeMap<String, String>,
    #[serde(default)]
    pub experiment: Option<Experiment>,
    #[serde(default)]
    pub fallback: Option<String>,
    #[serde(default)]
    pub limits: Limits,
}

/// An A/B split: each end user lands on one variant, with probability weight / total.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// The header that names the end user when the request has no `user` field.
    #[serde(default = "default_user_header")]
    pub user_header: String,
    pub variants: Vec<Variant>,
}

fn default_user_header() -> String {
    "x-user-id".into()
}

/// One arm of an experiment.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    pub route: String,
    pub weight: u32,
}

/// Per-tenant limits; each absent field means no limit (or the tier's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_second: Option<f64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent_requests: Option<u32>,
    pub max_tokens: Option<u32>,
    pub max_context_tokens: Option<u32>,
}

impl Limits {
    /// `self`'s fields, each falling back to `base`'s.
    fn or(self, base: Limits) -> Limits {
        Limits {
            requests_per_second: self.requests_per_second.or(base.requests_per_second),
            tokens_per_minute: self.tokens_per_minute.or(base.tokens_per_minute),
            max_concurrent_requests: self
                .max_concurrent_requests
                .or(base.max_concurrent_requests),
            max_tokens: self.max_tokens.or(base.max_tokens),
            max_context_tokens: self.max_context_tokens.or(base.max_context_tokens),
        }
    }

    fn validate(&self, field: &str) -> Result<(), PolicyError> {
        if let Some(rps) = self.requests_per_second {
            if !(rps.is_finite() && rps > 0.0) {
                return Err(bad(
                    format!("{field}.requests_per_second"),
                    format!("must be a positive number, not {rps}"),
                ));
            }
        }
        let positive = [
            ("tokens_per_minute", self.tokens_per_minute),
            (
                "max_concurrent_requests",
                self.max_concurrent_requests.map(u64::from),
            ),
            ("max_tokens", self.max_tokens.map(u64::from)),
            ("max_context_tokens", self.max_context_tokens.map(u64::from)),
        ];
        for (name, value) in positive {
            if value == Some(0) {
                return Err(bad(format!("{field}.{name}"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A tenant as the request path sees it: tier resolved, limits merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    /// The tier's name, or `default` when the tenant has none.
    pub tier: String,
    /// Fair-share weight (the tier's, 1 by default).
    pub weight: u32,
    /// The target tier routing picks, when the tier names one.
    pub tier_route: Option<String>,
    /// `None`: every served model.
    pub models: Option<HashSet<String>>,
    pub default_route: Option<String>,
    pub features: BTreeMap<String, String>,
    pub experiment: Option<Experiment>,
    pub fallback: Option<String>,
    pub limits: Limits,
}

impl Tenant {
    /// Whether the tenant may use `target`.
    pub fn may_use(&self, target: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(target))
    }
}

/// A validated policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    tenants: BTreeMap<String, Tenant>,
    /// Key hash (hex) to tenant name.
    by_key: HashMap<String, String>,
    admin_keys: HashSet<String>,
}

/// Who a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyOwner<'a> {
    Tenant(&'a Tenant),
    Admin,
}

impl Policy {
    /// Parses and validates YAML (JSON is YAML too).
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let spec: PolicySpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let field = if path == "." {
                "(document)".into()
            } else {
                path
            };
            bad(field, inner.to_string())
        })?;
        Policy::from_spec(spec)
    }

    /// Validates a parsed spec.
    pub fn from_spec(spec: PolicySpec) -> Result<Policy, PolicyError> {
        let mut seen_keys: HashMap<String, String> = HashMap::new();
        let mut admin_keys = HashSet::new();
        for (i, hash) in spec.admin_key_hashes.iter().enumerate() {
            let field = format!("admin_key_hashes[{i}]");
            let hash = normalize_hash(hash, &field)?;
            seen_keys.insert(hash.clone(), field);
            admin_keys.insert(hash);
        }
        for (name, tier) in &spec.tiers {
            let field = format!("tiers.{name}");
            if tier.weight == Some(0) {
                return Err(bad(format!("{field}.weight"), "must be at least 1"));
            }
            tier.limits.validate(&format!("{field}.limits"))?;
        }
        if spec.tenants.is_empty() {
            return Err(bad("tenants", "the policy names no tenant"));
        }
        let mut tenants = BTreeMap::new();
        let mut by_key = HashMap::new();
        for (name, t) in spec.tenants {
            let field = format!("tenants.{name}");
            if t.key_hashes.is_empty() {
                return Err(bad(
                    format!("{field}.key_hashes"),
                    "a tenant needs at least one key hash",
                ));
            }
            for (i, hash) in t.key_hashes.iter().enumerate() {
                let here = format!("{field}.key_hashes[{i}]");
                let hash = normalize_hash(hash, &here)?;
                if let Some(other) = seen_keys.insert(hash.clone(), here.clone()) {
                    return Err(bad(here, format!("the same key hash is also at `{other}`")));
                }
                by_key.insert(hash, name.clone());
            }
            let tier = match &t.tier {
                Some(tier) => Some(spec.tiers.get(tier).ok_or_else(|| {
                    let known: Vec<&str> = spec.tiers.keys().map(String::as_str).collect();
                    bad(
                        format!("{field}.tier"),
                        format!("unknown tier `{tier}` (tiers: {})", list(&known)),
                    )
                })?),
                None => None,
            };
            t.limits.validate(&format!("{field}.limits"))?;
            let models = t.models.map(|m| m.into_iter().collect::<HashSet<_>>());
            let allowed = |target: &str, at: String| match &models {
                Some(m) if !m.contains(target) => Err(bad(
                    at,
                    format!("routes to `{target}`, which is not in this tenant's `models`"),
                )),
                _ => Ok(()),
            };
            if let Some(route) = &t.default_route {
                allowed(route, format!("{field}.default_route"))?;
            }
            if let Some(route) = tier.and_then(|tier| tier.route.as_ref()) {
                allowed(route, format!("{field}.tier"))?;
            }
            if let Some(route) = &t.fallback {
                allowed(route, format!("{field}.fallback"))?;
            }
            for (feature, route) in &t.features {
                allowed(route, format!("{field}.features.{feature}"))?;
            }
            if let Some(exp) = &t.experiment {
                let at = format!("{field}.experiment");
                if exp.variants.is_empty() {
                    return Err(bad(format!("{at}.variants"), "needs at least one variant"));
                }
                let mut names = HashSet::new();
                for (i, v) in exp.variants.iter().enumerate() {
                    let vat = format!("{at}.variants[{i}]");
                    if v.weight == 0 {
                        return Err(bad(format!("{vat}.weight"), "must be at least 1"));
                    }
                    if !names.insert(v.name.as_str()) {
                        return Err(bad(
                            format!("{vat}.name"),
                            format!("variant `{}` appears twice", v.name),
                        ));
                    }
                    allowed(&v.route, format!("{vat}.route"))?;
                }
                if axum::http::HeaderName::try_from(exp.user_header.as_str()).is_err() {
                    return Err(bad(
                        format!("{at}.user_header"),
                        format!("`{}` is not a valid header name", exp.user_header),
                    ));
                }
            }
            let tenant = Tenant {
                tier: t.tier.clone().unwrap_or_else(|| "default".into()),
                weight: tier.and_then(|tier| tier.weight).unwrap_or(1),
                tier_route: tier.and_then(|tier| tier.route.clone()),
                models,
                default_route: t.default_route,
                features: t.features,
                experiment: t.experiment,
                fallback: t.fallback,
                limits: t
                    .limits
                    .or(tier.map(|tier| tier.limits).unwrap_or_default()),
                name: name.clone(),
            };
            tenants.insert(name, tenant);
        }
        Ok(Policy {
            tenants,
            by_key,
            admin_keys,
        })
    }

    /// Who holds the key whose SHA-256 is `hash` (hex).
    pub fn owner(&self, hash: &str) -> Option<KeyOwner<'_>> {
        if self.admin_keys.contains(hash) {
            return Some(KeyOwner::Admin);
        }
        let name = self.by_key.get(hash)?;
        self.tenants.get(name).map(KeyOwner::Tenant)
    }

    /// A tenant by name.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.get(name)
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }
}

/// A key hash as the policy holds it: 64 lowercase hex digits, `sha256:` prefix optional.
fn normalize_hash(hash: &str, field: &str) -> Result<String, PolicyError> {
    let hex = hash
        .strip_prefix("sha256:")
        .unwrap_or(hash)
        .to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(hex);
    }
    Err(bad(
        field,
        "not a SHA-256 hash (64 hex digits, optionally after `sha256:`): the policy holds key \
         hashes, never keys; `tpserve gateway hash-key` prints a new key and its hash",
    ))
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "none defined".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn policy(yaml: &str) -> Result<Policy, PolicyError> {
        Policy::parse(yaml)
    }

    #[test]
    fn a_full_policy_parses_and_merges_tier_limits() {
        let p = policy(&format!(
            "tiers:\n  pro: {{weight: 3, route: big, limits: {{max_tokens: 100, tokens_per_minute: 5}}}}\n\
             tenants:\n  acme:\n    key_hashes: [\"{H1}\"]\n    tier: pro\n    models: [big, small]\n    \
             default_route: small\n    features: {{summarize: small}}\n    fallback: small\n    \
             experiment: {{name: e, variants: [{{name: a, route: big, weight: 1}}, {{name: b, route: small, weight: 1}}]}}\n    \
             limits: {{max_tokens: 50}}\n"
        ))
        .unwrap();
        let KeyOwner::Tenant(t) = p.owner(&H1[7..]).unwrap() else {
            panic!("a tenant key")
        };
        assert_eq!(t.weight, 3);
        assert_eq!(t.limits.max_tokens, Some(50), "the tenant's own limit wins");
        assert_eq!(t.limits.tokens_per_minute, Some(5), "the tier's fills in");
        assert_eq!(t.tier_route.as_deref(), Some("big"));
        assert!(p.owner(H2).is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n    tier: gold\n"), "tenants.a.tier"),
            ("tenants:\n  a:\n    key_hashes: [\"sk-plainkey\"]\n".into(), "tenants.a.key_hashes[0]"),
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n    limits: {{requests_per_second: 0}}\n"), "tenants.a.limits.requests_per_second"),
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n    limits: {{max_tokens: -1}}\n"), "tenants.a.limits.max_tokens"),
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n    models: [x]\n    default_route: y\n"), "tenants.a.default_route"),
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n  b:\n    key_hashes: [\"{H1}\"]\n"), "tenants.b.key_hashes[0]"),
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n    experiment: {{name: e, variants: [{{name: a, route: x, weight: 0}}]}}\n"), "tenants.a.experiment.variants[0].weight"),
            (format!("tenants:\n  a:\n    key_hashes: [\"{H1}\"]\n    colour: red\n"), "tenants.a.colour"),
            ("tenants: {}\n".into(), "tenants"),
            ("tiers: [\n".into(), "tiers"),
            ("tenants: {a: \"\n".into(), "tenants.a"),
            ("- just a list\n".into(), "(document)"),
        ];
        for (yaml, field) in cases {
            let err = policy(&yaml).unwrap_err();
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
    }
}
