//! Which target (served model or adapter) a tenant's request gets. Pure: the caller passes what
//! is available.
//!
//! A request whose `model` names a target other than the primary served name asks for it
//! explicitly: it gets it if the tenant may use it (else 403) and it is served (else 404). A
//! request for the primary name, or with no `model`, is routed by the first rule that applies:
//!
//! 1. **feature**: the `X-Feature` header's value, if the tenant's `features` maps it;
//! 2. **experiment**: the tenant's A/B split; the end user (the request's `user`, else the
//!    experiment's `user_header`) is hashed with the experiment's name, so a user stays on one
//!    variant on every replica; a request naming no user is placed at random;
//! 3. **tenant**: the tenant's `default_route`;
//! 4. **tier**: the `route` of the tenant's tier;
//! 5. **base**: the primary served name.
//!
//! If the chosen target is not available (an adapter that cannot be loaded, a name not served),
//! the tenant's `fallback` is taken when it is available; otherwise the request fails with 503.

use super::keys::hash64;
use super::policy::Tenant;

/// The parts of a request routing looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteRequest<'a> {
    /// The request's `model`.
    pub model: Option<&'a str>,
    /// The `X-Feature` header.
    pub feature: Option<&'a str>,
    /// The request's `user` field.
    pub user: Option<&'a str>,
    /// The experiment's user header, when the request has it (the caller reads the header the
    /// tenant's experiment names).
    pub user_header: Option<&'a str>,
}

/// Which rule chose the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Explicit,
    Feature(String),
    Experiment(String),
    Tenant,
    Tier(String),
    Base,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Explicit => write!(f, "explicit"),
            Rule::Feature(name) => write!(f, "feature:{name}"),
            Rule::Experiment(name) => write!(f, "experiment:{name}"),
            Rule::Tenant => write!(f, "tenant"),
            Rule::Tier(name) => write!(f, "tier:{name}"),
            Rule::Base => write!(f, "base"),
        }
    }
}

/// The routing decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The served model or adapter the request runs on.
    pub target: String,
    pub rule: Rule,
    /// The experiment's variant, under `Rule::Experiment`.
    pub variant: Option<String>,
    /// The target the rule chose, when it was unavailable and the fallback was taken.
    pub fallback_from: Option<String>,
    /// The feature as a metric label: the header's value if the tenant maps it, `other` if it
    /// does not, `none` without the header (so the label set stays bounded by the policy).
    pub feature_label: String,
}

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The tenant may not use this target (403).
    NotAllowed { target: String },
    /// An explicitly requested target is not served (404).
    NotFound { target: String },
    /// The routed target is unavailable and there is no usable fallback (503).
    Unavailable {
        target: String,
        fallback: Option<String>,
    },
}

/// Routes `request` for `tenant`; `base` is the primary served name.
pub fn route(
    tenant: &Tenant,
    request: &RouteRequest<'_>,
    base: &str,
    available: impl Fn(&str) -> bool,
) -> Result<Route, RouteError> {
    let feature_label = match request.feature {
        None => "none".to_string(),
        Some(f) if tenant.features.contains_key(f) => f.to_string(),
        Some(_) => "other".to_string(),
    };
    if let Some(model) = request.model.filter(|m| *m != base) {
        if !tenant.may_use(model) {
            return Err(RouteError::NotAllowed {
                target: model.into(),
            });
        }
        if !available(model) {
            return Err(RouteError::NotFound {
                target: model.into(),
            });
        }
        return Ok(Route {
            target: model.into(),
            rule: Rule::Explicit,
            variant: None,
            fallback_from: None,
            feature_label,
        });
    }
    let (target, rule, variant) = choose(tenant, request, base);
    if !tenant.may_use(&target) {
        return Err(RouteError::NotAllowed { target });
    }
    let mut route = Route {
        target,
        rule,
        variant,
        fallback_from: None,
        feature_label,
    };
    if available(&route.target) {
        return Ok(route);
    }
    match &tenant.fallback {
        Some(fallback) if available(fallback) => {
            route.fallback_from = Some(std::mem::replace(&mut route.target, fallback.clone()));
            Ok(route)
        }
        fallback => Err(RouteError::Unavailable {
            target: route.target,
            fallback: fallback.clone(),
        }),
    }
}

fn choose(
    tenant: &Tenant,
    request: &RouteRequest<'_>,
    base: &str,
) -> (String, Rule, Option<String>) {
    if let Some((feature, target)) = request
        .feature
        .and_then(|f| tenant.features.get_key_value(f))
    {
        return (target.clone(), Rule::Feature(feature.clone()), None);
    }
    if let Some(exp) = &tenant.experiment {
        let total: u64 = exp.variants.iter().map(|v| u64::from(v.weight)).sum();
        let point = match request.user.or(request.user_header) {
            Some(user) => hash64(&[&exp.name, user]) % total,
            None => rand::random::<u64>() % total,
        };
        let mut acc = 0;
        for v in &exp.variants {
            acc += u64::from(v.weight);
            if point < acc {
                return (
                    v.route.clone(),
                    Rule::Experiment(exp.name.clone()),
                    Some(v.name.clone()),
                );
            }
        }
    }
    if let Some(target) = &tenant.default_route {
        return (target.clone(), Rule::Tenant, None);
    }
    if let Some(target) = &tenant.tier_route {
        return (target.clone(), Rule::Tier(tenant.tier.clone()), None);
    }
    (base.to_string(), Rule::Base, None)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::gateway::policy::{KeyOwner, Policy};

    const HASH: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn tenant(body: &str) -> Tenant {
        let yaml = format!(
            "tiers: {{pro: {{route: tiered}}}}\ntenants:\n  t:\n    key_hashes: [\"{HASH}\"]\n{body}"
        );
        let policy = Policy::parse(&yaml).unwrap();
        match policy.owner(HASH) {
            Some(KeyOwner::Tenant(t)) => t.clone(),
            _ => panic!("a tenant"),
        }
    }

    fn served(name: &str) -> bool {
        ["base", "tiered", "summarizer", "a", "b", "default"].contains(&name)
    }

    fn target(t: &Tenant, r: RouteRequest<'_>) -> (String, String) {
        let route = route(t, &r, "base", served).unwrap();
        (route.target, route.rule.to_string())
    }

    #[test]
    fn rules_apply_in_the_documented_order() {
        let all = tenant(
            "    tier: pro\n    default_route: default\n    features: {summarize: summarizer}\n    \
             experiment: {name: e, variants: [{name: v, route: a, weight: 1}]}\n",
        );
        let feature = RouteRequest {
            feature: Some("summarize"),
            ..Default::default()
        };
        assert_eq!(
            target(&all, feature),
            ("summarizer".into(), "feature:summarize".into())
        );
        let unmapped = RouteRequest {
            feature: Some("translate"),
            ..Default::default()
        };
        assert_eq!(target(&all, unmapped), ("a".into(), "experiment:e".into()));
        let no_exp = tenant("    tier: pro\n    default_route: default\n");
        assert_eq!(
            target(&no_exp, RouteRequest::default()),
            ("default".into(), "tenant".into())
        );
        let tier = tenant("    tier: pro\n");
        assert_eq!(
            target(&tier, RouteRequest::default()),
            ("tiered".into(), "tier:pro".into())
        );
        let plain = tenant("");
        assert_eq!(
            target(&plain, RouteRequest::default()),
            ("base".into(), "base".into())
        );
        let explicit = RouteRequest {
            model: Some("b"),
            feature: Some("summarize"),
            ..Default::default()
        };
        assert_eq!(target(&all, explicit), ("b".into(), "explicit".into()));
    }

    #[test]
    fn a_thousand_users_split_by_weight_and_stay_put() {
        let t = tenant(
            "    experiment: {name: e, variants: [{name: a, route: a, weight: 70}, {name: b, route: b, weight: 30}]}\n",
        );
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..1000 {
            let user = format!("user-{i}");
            let r = RouteRequest {
                user: Some(&user),
                ..Default::default()
            };
            let first = route(&t, &r, "base", served).unwrap();
            for _ in 0..3 {
                assert_eq!(route(&t, &r, "base", served).unwrap(), first, "sticky");
            }
            *counts.entry(first.variant.unwrap()).or_default() += 1;
        }
        let a = counts["a"] as f64 / 1000.0;
        assert!((a - 0.7).abs() <= 0.03, "variant a got {a}");
    }

    #[test]
    fn unavailable_targets_fall_back_or_fail() {
        let with = tenant("    default_route: gone\n    fallback: base\n");
        let r = route(&with, &RouteRequest::default(), "base", served).unwrap();
        assert_eq!(
            (r.target.as_str(), r.fallback_from.as_deref()),
            ("base", Some("gone"))
        );
        let without = tenant("    default_route: gone\n");
        assert!(matches!(
            route(&without, &RouteRequest::default(), "base", served),
            Err(RouteError::Unavailable { .. })
        ));
    }

    #[test]
    fn models_outside_the_tenants_list_are_refused() {
        let t = tenant("    models: [a]\n    default_route: a\n");
        let ask = |m| {
            route(
                &t,
                &RouteRequest {
                    model: Some(m),
                    ..Default::default()
                },
                "base",
                served,
            )
        };
        assert!(matches!(ask("b"), Err(RouteError::NotAllowed { .. })));
        assert_eq!(ask("a").unwrap().target, "a");
        assert_eq!(
            route(&t, &RouteRequest::default(), "base", served)
                .unwrap()
                .target,
            "a"
        );
        let u = tenant("    models: [a]\n");
        assert!(matches!(
            route(&u, &RouteRequest::default(), "base", served),
            Err(RouteError::NotAllowed { .. })
        ));
    }
}
