//! Compiles the Trellis protobuf APIs with the pure-Rust `protox` compiler (no `protoc`), once,
//! for both the control plane (servers) and the proxy (clients).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "trellis/identity/v1/identity.proto",
            "trellis/config/v1/config.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .bytes(".trellis.config.v1.Snapshot.services")
        .compile_fds(fds)?;
    Ok(())
}
