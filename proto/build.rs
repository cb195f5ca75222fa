//! Compiles `worker.proto` with the protoc shipped by `protoc-bin-vendored`, so a build needs no
//! system protoc. A `PROTOC` already set in the environment wins.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=worker.proto");
    tonic_prost_build::configure().compile_protos(&["worker.proto"], &["."])?;
    // The protocol's digest (`PROTOCOL` in lib.rs): FNV-1a over the file's bytes, so any change
    // to it, even one a decoder would tolerate, makes builds before and after it refuse each
    // other at start instead of misreading each other's plans.
    let text = std::fs::read("worker.proto")?;
    let digest = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    println!("cargo:rustc-env=TPSERVE_PROTOCOL_DIGEST={digest:016x}");
    Ok(())
}
