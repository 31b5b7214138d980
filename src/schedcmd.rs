//! `breakfs sched`: the kube-scheduler extender service.

use std::path::PathBuf;

use anyhow::{Context, Result};
use breakfs_sched::{SchedConfig, Server};
use clap::Args;

/// The line the service prints on stdout once it serves.
const READY: &str = "BREAKFS-SCHED-READY";

#[derive(Args)]
pub struct SchedArgs {
    /// A YAML config: netWeight, layerWeight, balancedWeight,
    /// leastRequestedWeight, cacheSumSize, nodes (name, url, cluster),
    /// plainHttp, listen, prefix, pollSecs, staleSecs, planSecs,
    /// kubernetes (enabled, url, publishLabels, syncSecs), tokenFile,
    /// maxBodySize. Flags win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:7490; port 0 picks a free one].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// A node daemon to watch: NAME=URL or NAME=URL@CLUSTER (NAME is the
    /// Kubernetes node name); repeat for each node.
    #[arg(long = "node", value_name = "NAME=URL[@CLUSTER]")]
    nodes: Vec<String>,
    /// Talk plain HTTP to registries.
    #[arg(long)]
    plain_http: bool,
    /// Bytes of hot layers the prefetch planner keeps in each cluster
    /// (a size like 26Gi or 20GiB; without it, no planner runs).
    #[arg(long, value_name = "SIZE")]
    cache_sum_size: Option<String>,
    /// Seconds between planner runs.
    #[arg(long, value_name = "SECS")]
    plan_secs: Option<f64>,
    /// Use the Kubernetes API (in-cluster service account or kubeconfig):
    /// watch Nodes and Pods for resources in NodeNames mode, discover node
    /// daemons by their breakfs.io/daemon-url annotation, publish measured
    /// links as node labels.
    #[arg(long)]
    kube: bool,
    /// The Kubernetes API at this URL, without credentials (e.g. what
    /// `kubectl proxy` serves); implies --kube.
    #[arg(long, value_name = "URL")]
    kube_url: Option<String>,
    /// A file holding a secret: `/plan` then needs it as `Authorization:
    /// Bearer SECRET`, and requests to the node daemons carry it (give them
    /// the same --token-file). The extender verbs stay open: kube-scheduler
    /// sends no token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Refuse request bodies larger than this (413), a size like 32Mi [default:
    /// 32Mi; `Nodes`-form args carry about 6.5 KB a node].
    #[arg(long, value_name = "SIZE")]
    max_body_size: Option<String>,
}

pub async fn run_sched(a: SchedArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => SchedConfig::from_file(p)
            .with_context(|| format!("the scheduler config {}", p.display()))?,
        None => SchedConfig::default(),
    };
    if let Some(l) = &a.listen {
        cfg.listen = l.clone();
    }
    for n in &a.nodes {
        cfg.nodes.push(n.parse()?);
    }
    cfg.plain_http |= a.plain_http;
    if let Some(c) = &a.cache_sum_size {
        cfg.cache_sum_size = Some(c.clone());
        cfg.cache_sum_bytes()?;
    }
    if let Some(p) = a.plan_secs {
        cfg.plan_secs = p;
    }
    if let Some(t) = &a.token_file {
        cfg.token_file = Some(t.clone());
    }
    if let Some(m) = &a.max_body_size {
        cfg.max_body_size = m.clone();
    }
    cfg.max_body().context("--max-body-size")?;
    let token = cfg
        .token_file
        .as_deref()
        .map(breakfs_fetch::guard::Token::from_file)
        .transpose()
        .context("--token-file")?;
    cfg.kubernetes.enabled |= a.kube || a.kube_url.is_some();
    if a.kube_url.is_some() {
        cfg.kubernetes.url = a.kube_url.clone();
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {} (choose another with --listen)", cfg.listen))?;
    let server = Server::start(cfg, token, listener).await?;
    println!("{READY} http://{}", server.local_addr());
    let shutdown = breakfs_node::shutdown_on_stop_signals(|| {})?;
    server
        .serve(shutdown)
        .await
        .context("the extender server stopped")?;
    Ok(())
}
