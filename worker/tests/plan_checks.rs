//! The runner refuses, on every rank and before any collective, a batch whose token ids are
//! outside the vocabulary or whose positions have no rotary table (tiny Llama: vocabulary 256,
//! 512 positions), and keeps working afterwards.

use tpserve_proto as pb;
use tpserve_worker::backend::DeviceChoice;
use tpserve_worker::thread_group::ThreadGroup;

fn tiny_llama_group(tp: usize) -> ThreadGroup {
    let group = ThreadGroup::start(DeviceChoice::Cpu, tp, 1).unwrap();
    let model = tpserve_e2e::repo_root().join("tests/fixtures/tiny-llama");
    let load = pb::LoadModelRequest {
        model_path: model.display().to_string(),
        load_format: pb::LoadFormat::Auto as i32,
        dtype: "auto".into(),
        dummy_seed: 0,
    };
    group.on_all(move |_, r| r.load_model(&load)).unwrap();
    group.on_all(|_, r| r.init_cache(64, 16)).unwrap();
    group
}

#[test]
fn token_ids_outside_the_vocabulary_and_positions_past_the_tables_are_refused() {
    let group = tiny_llama_group(2);
    let errors = group
        .on_all(|_, r| Ok(r.prompt_logits(&[1, 2, 256], 8).unwrap_err().to_string()))
        .unwrap();
    for e in &errors {
        assert!(
            e.contains("token id 256 is outside the vocabulary of 256"),
            "{e}"
        );
    }
    let long: Vec<u32> = (0..513).map(|i| i % 200).collect();
    let errors = group
        .on_all(move |_, r| Ok(r.prompt_logits(&long, 64).unwrap_err().to_string()))
        .unwrap();
    for e in &errors {
        assert!(
            e.contains("position 512 is beyond the model's 512 positions"),
            "{e}"
        );
    }
    let fine = group
        .on_all(|_, r| r.prompt_logits(&[1, 2, 255], 8))
        .unwrap();
    assert_eq!(fine[0].as_ref().map(Vec::len), Some(3 * 256));
}
