//! Writing small checkpoints for the tests: the tiny Llama fixture's tensors, changed as a test
//! needs, saved as `model.safetensors` with the fixture's config.json (plus a
//! `quantization_config`).

use std::path::Path;

use serde_json::Value;

use super::repo_root;

/// One tensor as stored.
pub struct Stored {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub fn f32_tensor(name: String, shape: Vec<usize>, values: &[f32]) -> Stored {
    Stored {
        name,
        dtype: safetensors::Dtype::F32,
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `tensors` and the tiny fixture's config.json (with `quantization`, if given) to `dir`.
pub fn write(dir: &Path, tensors: &[Stored], quantization: Option<Value>) {
    std::fs::create_dir_all(dir).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let view =
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let fixture = repo_root().join("tests/fixtures/tiny-llama/config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    if let Some(q) = quantization {
        config["quantization_config"] = q;
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// The tiny fixture's tensors, as (name, shape, f32 values), sorted by name.
pub fn tiny_llama_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let source =
        tpserve_modelfile::ModelSource::open(&repo_root().join("tests/fixtures/tiny-llama"), None)
            .unwrap();
    let weights = source.weights().unwrap();
    weights
        .names()
        .into_iter()
        .map(|name| {
            let t = weights.read(&name).unwrap();
            let shape = t.dims().to_vec();
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (name, shape, values)
        })
        .collect()
}

/// The fixture's linear layers, by their names' ends.
pub const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Whether `name` is one of the fixture's linear weights.
pub fn is_linear(name: &str) -> bool {
    LINEARS
        .iter()
        .any(|l| name.ends_with(&format!("{l}.weight")))
}

/// A quantized checkpoint (`quantized/`) beside its weights dequantized to float32 (`f32/`), in
/// one temporary directory.
pub struct TwinPair {
    dir: tempfile::TempDir,
}

impl TwinPair {
    pub fn quantized(&self) -> std::path::PathBuf {
        self.dir.path().join("quantized")
    }

    pub fn f32(&self) -> std::path::PathBuf {
        self.dir.path().join("f32")
    }

    /// The weights of both: (quantized, f32).
    pub fn readers(
        &self,
    ) -> (
        Box<dyn tpserve_modelfile::WeightReader>,
        Box<dyn tpserve_modelfile::WeightReader>,
    ) {
        let open = |dir: &Path| {
            tpserve_modelfile::ModelSource::open(dir, None)
                .unwrap()
                .weights()
                .unwrap()
        };
        (open(&self.quantized()), open(&self.f32()))
    }

    /// Asserts that the quantized checkpoint's prefill logits (40 tokens, chunks of 13) equal
    /// its twin's bit for bit at TP=1 and TP=2.
    pub fn assert_same_logits(&self, what: &str) {
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 256).collect();
        for tp in [1, 2] {
            let want = super::prefill_logits(&self.f32(), tp, &ids, 13);
            let got = super::prefill_logits(&self.quantized(), tp, &ids, 13);
            assert!(
                got == want,
                "{what} tp={tp}: the quantized checkpoint's logits differ from its twin's"
            );
        }
    }
}

/// One pair per variant, written by `write_pair(variant, quantized_dir, f32_dir)`.
pub fn twin_pairs<V: Copy>(
    variants: &[V],
    write_pair: impl Fn(V, &Path, &Path),
) -> Vec<(V, TwinPair)> {
    variants
        .iter()
        .map(|&variant| {
            let pair = TwinPair {
                dir: tempfile::tempdir().unwrap(),
            };
            write_pair(variant, &pair.quantized(), &pair.f32());
            (variant, pair)
        })
        .collect()
}
