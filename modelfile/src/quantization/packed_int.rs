//! Integer weights packed into int32 words, as `quantization_config` describes them:
//! `quant_method: "awq"` (AutoAWQ's GEMM packing: 4-bit, groups, zero points) and
//! `quant_method: "gptq"` (AutoGPTQ / GPTQModel: 4- or 8-bit, groups or one group per column,
//! optional act-order `desc_act`, symmetric or not, checkpoint format `gptq` or `gptq_v2`).
//! The tensors themselves are read by `crate::weights::packed_int`.

use serde_json::Value as Json;

/// Which packing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedIntMethod {
    /// `qweight [in, out / 8]` (eight output columns a word, in AWQ's interleaved order),
    /// `qzeros [groups, out / 8]` the same, `scales [groups, out]`.
    Awq,
    /// `qweight [in * bits / 32, out]` (32 / bits input rows a word, in order), `qzeros
    /// [groups, out * bits / 32]`, `scales [groups, out]`, `g_idx [in]`.
    Gptq,
}

impl PackedIntMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Awq => "awq",
            Self::Gptq => "gptq",
        }
    }
}

/// A packed-integer checkpoint's scheme. A weight's value is `(q - zero) * scale`, with `q`,
/// `zero` and `scale` those of its element's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedIntCheckpoint {
    pub method: PackedIntMethod,
    /// 4, or 8 (GPTQ only).
    pub bits: u32,
    /// Input features per group; `None`: one group over all of them (GPTQ's `group_size: -1`).
    pub group_size: Option<usize>,
    /// GPTQ's act-order (`desc_act`): `g_idx` may put input features in groups out of order.
    pub act_order: bool,
    /// GPTQ's `sym` (zero points all at the middle of the range); AWQ is asymmetric.
    pub symmetric: bool,
    /// Added to the stored zero points: GPTQ's original format (`checkpoint_format: "gptq"`)
    /// stores `zero - 1`; `gptq_v2` and AWQ store the zero point itself.
    pub zero_offset: i32,
}

impl PackedIntCheckpoint {
    /// Values per int32 word.
    pub fn pack(&self) -> usize {
        32 / self.bits as usize
    }

    /// A one-line description: `gptq (4-bit integer weights, groups of 128 inputs, act-order,
    /// symmetric)`.
    pub fn describe(&self) -> String {
        let groups = match self.group_size {
            Some(g) => format!("groups of {g} inputs"),
            None => "one group per output".to_string(),
        };
        let order = if self.act_order { ", act-order" } else { "" };
        let zeros = if self.symmetric {
            "symmetric"
        } else {
            "zero points"
        };
        format!(
            "{} ({}-bit integer weights, {groups}{order}, {zeros})",
            self.method.as_str(),
            self.bits
        )
    }
}

/// The packed-integer scheme of a `quantization_config` object: `None` when its method is not
/// `awq` or `gptq`, `Some(Err(why))` for a form of them we do not read.
pub fn packed_int_scheme(q: &Json) -> Option<Result<PackedIntCheckpoint, String>> {
    match q.get("quant_method").and_then(Json::as_str)? {
        "awq" => Some(awq(q)),
        "gptq" => Some(gptq(q)),
        _ => None,
    }
}

/// The first of `keys` that `q` has, as an integer; `Err` when present but not one.
fn int_field(q: &Json, keys: &[&str]) -> Result<Option<i64>, String> {
    for key in keys {
        match q.get(*key) {
            None | Some(Json::Null) => continue,
            Some(v) => {
                return v
                    .as_i64()
                    .map(Some)
                    .ok_or(format!("{key} {v} is not an integer"))
            }
        }
    }
    Ok(None)
}

fn bool_field(q: &Json, key: &str, default: bool) -> Result<bool, String> {
    match q.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(v) => v.as_bool().ok_or(format!("{key} {v} is not true or false")),
    }
}

/// AutoAWQ's `AwqConfig` (`bits` or `w_bit`, `group_size` or `q_group_size`, `zero_point`,
/// `version`).
fn awq(q: &Json) -> Result<PackedIntCheckpoint, String> {
    let bits = int_field(q, &["bits", "w_bit"])?.unwrap_or(4);
    if bits != 4 {
        return Err(format!(
            "awq with {bits}-bit weights (AWQ's packing is 4-bit)"
        ));
    }
    let group = int_field(q, &["group_size", "q_group_size"])?.unwrap_or(128);
    if group <= 0 {
        return Err(format!(
            "awq with group_size {group} (a positive group size is needed)"
        ));
    }
    if !bool_field(q, "zero_point", true)? {
        return Err("awq with zero_point false (tpserve reads AWQ with zero points)".into());
    }
    match q.get("version").and_then(Json::as_str).unwrap_or("gemm") {
        "gemm" | "GEMM" => {}
        other => {
            return Err(format!(
                "awq version {other:?} (tpserve reads the GEMM packing, version \"gemm\")"
            ))
        }
    }
    Ok(PackedIntCheckpoint {
        method: PackedIntMethod::Awq,
        bits: 4,
        group_size: Some(group as usize),
        act_order: false,
        symmetric: false,
        zero_offset: 0,
    })
}

/// AutoGPTQ's and GPTQModel's `GPTQConfig` (`bits`, `group_size`, `desc_act`, `sym`,
/// `checkpoint_format`, `lm_head`, `dynamic`).
fn gptq(q: &Json) -> Result<PackedIntCheckpoint, String> {
    let bits = int_field(q, &["bits"])?.unwrap_or(4);
    if bits != 4 && bits != 8 {
        return Err(format!(
            "gptq with {bits}-bit weights (tpserve reads 4- and 8-bit GPTQ)"
        ));
    }
    let group_size = match int_field(q, &["group_size"])?.unwrap_or(128) {
        -1 => None,
        g if g > 0 => Some(g as usize),
        g => {
            return Err(format!(
                "gptq with group_size {g} (expected -1 or positive)"
            ))
        }
    };
    let zero_offset = match q
        .get("checkpoint_format")
        .and_then(Json::as_str)
        .unwrap_or("gptq")
    {
        "gptq" => 1,
        "gptq_v2" => 0,
        other => {
            return Err(format!(
                "gptq checkpoint_format {other:?} (tpserve reads \"gptq\" and \"gptq_v2\")"
            ))
        }
    };
    if bool_field(q, "lm_head", false)? {
        return Err("gptq with a quantized lm_head (lm_head: true)".into());
    }
    if q.get("dynamic")
        .and_then(Json::as_object)
        .is_some_and(|d| !d.is_empty())
    {
        return Err("gptq with per-module overrides (dynamic)".into());
    }
    Ok(PackedIntCheckpoint {
        method: PackedIntMethod::Gptq,
        bits: bits as u32,
        group_size,
        act_order: bool_field(q, "desc_act", false)?,
        symmetric: bool_field(q, "sym", true)?,
        zero_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scheme(q: Json) -> Result<PackedIntCheckpoint, String> {
        packed_int_scheme(&q).expect("a packed-integer method")
    }

    #[test]
    fn awq_configs_as_autoawq_writes_them() {
        let s = scheme(json!({"quant_method": "awq", "bits": 4, "group_size": 128,
                              "zero_point": true, "version": "gemm"}))
        .unwrap();
        assert_eq!(
            (s.method, s.bits, s.group_size, s.zero_offset),
            (PackedIntMethod::Awq, 4, Some(128), 0)
        );
        assert_eq!(
            s.describe(),
            "awq (4-bit integer weights, groups of 128 inputs, zero points)"
        );
        let s = scheme(json!({"quant_method": "awq", "w_bit": 4, "q_group_size": 64})).unwrap();
        assert_eq!(s.group_size, Some(64));
        let e = scheme(json!({"quant_method": "awq", "version": "gemv"})).unwrap_err();
        assert!(e.contains("gemv"), "{e}");
        let e = scheme(json!({"quant_method": "awq", "bits": 3})).unwrap_err();
        assert!(e.contains("3-bit"), "{e}");
        let e = scheme(json!({"quant_method": "awq", "zero_point": false})).unwrap_err();
        assert!(e.contains("zero_point"), "{e}");
        let e = scheme(json!({"quant_method": "awq", "group_size": "x"})).unwrap_err();
        assert!(e.contains("not an integer"), "{e}");
    }

    #[test]
    fn gptq_configs_as_autogptq_and_gptqmodel_write_them() {
        let s = scheme(json!({"quant_method": "gptq", "bits": 4, "group_size": 128,
                              "desc_act": true, "sym": true}))
        .unwrap();
        assert_eq!(
            (
                s.bits,
                s.group_size,
                s.act_order,
                s.symmetric,
                s.zero_offset
            ),
            (4, Some(128), true, true, 1)
        );
        assert_eq!(
            s.describe(),
            "gptq (4-bit integer weights, groups of 128 inputs, act-order, symmetric)"
        );
        let s = scheme(json!({"quant_method": "gptq", "bits": 8, "group_size": -1,
                              "sym": false, "checkpoint_format": "gptq_v2"}))
        .unwrap();
        assert_eq!(
            (s.bits, s.group_size, s.symmetric, s.zero_offset, s.pack()),
            (8, None, false, 0, 4)
        );
        for (bad, word) in [
            (json!({"quant_method": "gptq", "bits": 3}), "3-bit"),
            (
                json!({"quant_method": "gptq", "group_size": 0}),
                "group_size 0",
            ),
            (
                json!({"quant_method": "gptq", "checkpoint_format": "marlin"}),
                "marlin",
            ),
            (json!({"quant_method": "gptq", "lm_head": true}), "lm_head"),
            (
                json!({"quant_method": "gptq", "dynamic": {"-:.*mlp.*": {}}}),
                "dynamic",
            ),
        ] {
            let e = scheme(bad).unwrap_err();
            assert!(e.contains(word), "{e}");
        }
        assert!(packed_int_scheme(&json!({"quant_method": "fp8"})).is_none());
    }
}
