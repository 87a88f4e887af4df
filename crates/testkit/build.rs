//! Compiles `proto/echo.proto` with the pure-Rust `protox` compiler (no `protoc` needed) and
//! generates the tonic client and server for the gRPC origin.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/echo.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
