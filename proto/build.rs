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
    Ok(())
}
