//! Compiles containerd's snapshots API (`proto/`) into the tonic server
//! and prost messages the snapshotter serves. protox parses the protos in
//! Rust (it ships the well-known types), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto/containerd/services/snapshots/v1/snapshots.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([root], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
