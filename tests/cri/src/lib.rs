//! Kubernetes' Container Runtime Interface (`runtime.v1`: RuntimeService
//! and ImageService) as a tonic client, so the integration tests can play
//! kubelet against containerd's CRI plugin. A dev-dependency only: the
//! `breakfs` binary never links it. `proto/README.md` says where the API
//! comes from.

use std::path::Path;

use tonic::transport::{Channel, Endpoint, Uri};

/// The code generated from `proto/runtime/v1/api.proto` (Apache-2.0).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod runtime {
    tonic::include_proto!("runtime.v1");
}

pub use runtime::image_service_client::ImageServiceClient;
pub use runtime::runtime_service_client::RuntimeServiceClient;

/// A channel to the CRI server on the Unix socket `path` (containerd's own
/// socket: the CRI plugin serves on containerd's gRPC server).
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is not used: every connection goes to the socket.
    Endpoint::from_static("http://cri")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
