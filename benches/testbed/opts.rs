//! The testbed's settings: the command line and the strategies.

use anyhow::{Result, anyhow, bail, ensure};

use super::corpus;

/// The testbed's settings (see `USAGE`).
pub struct Opts {
    /// Clusters.
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes: usize,
    /// Corpus families.
    pub families: Vec<String>,
    /// Deployments replayed.
    pub deployments: usize,
    /// Clients onto clusters.
    pub seed: u64,
    /// Cluster ↔ registry round trip, ms.
    pub cloud_rtt: u64,
    /// Cluster ↔ registry bandwidth, Mbit/s, shared by the cluster.
    pub cloud_mbit: u64,
    /// Node ↔ node inside a cluster, ms.
    pub peer_rtt: u64,
    /// Node ↔ node inside a cluster, Mbit/s.
    pub peer_mbit: u64,
    /// Node ↔ node across clusters, ms.
    pub cross_rtt: u64,
    /// Node ↔ node across clusters, Mbit/s (one link per pair of clusters).
    pub cross_mbit: u64,
    /// The trace's arrivals scaled into this many seconds.
    pub replay_secs: f64,
    /// What to run, in order.
    pub strategies: Vec<Strategy>,
    /// gzip level of the eStargz conversions (`None`: ctr-remote's default,
    /// 9, what its users get).
    pub estargz_level: Option<u32>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            clusters: 4,
            nodes: 4,
            families: corpus::FAMILIES
                .iter()
                .map(|f| f.name.to_string())
                .collect(),
            deployments: 32,
            seed: 1,
            cloud_rtt: 50,
            cloud_mbit: 100,
            peer_rtt: 1,
            peer_mbit: 1000,
            cross_rtt: 20,
            cross_mbit: 200,
            replay_secs: 60.0,
            strategies: Strategy::ALL.to_vec(),
            estargz_level: None,
        }
    }
}

/// How deployments get their images.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Strategy {
    /// Layers pulled one by one and extracted, overlay2-style.
    DockerLike,
    /// The real containerd: `ctr image pull` + `ctr run`.
    Containerd,
    /// The original converted per layer by `ctr-remote image convert
    /// --estargz`, mounted lazily from the cloud only.
    Estargz,
    /// The original converted by `ctr-remote image optimize` (its command
    /// recorded, a prefetch landmark per layer), mounted lazily from the
    /// cloud only.
    EstargzOptimized,
    /// Everything: refactored images, peers, prefetch, placement.
    Breakfs,
    /// Ablations: breakfs without one of its parts.
    /// The original images.
    NoRefactor,
    /// No peer nodes.
    NoPeers,
    /// No prefetch planner.
    NoPrefetch,
    /// Least-loaded placement instead of `breakfs sched`.
    NoSched,
    /// A variant (not run unless asked for): each mount also hydrates its
    /// image in the background (the node's default).
    Hydrate,
}

impl Strategy {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::DockerLike => "docker-like",
            Strategy::Containerd => "containerd",
            Strategy::Estargz => "eStargz (ctr-remote convert, lazy from the cloud)",
            Strategy::EstargzOptimized => {
                "eStargz optimized (ctr-remote optimize, lazy from the cloud)"
            }
            Strategy::Breakfs => "breakfs",
            Strategy::NoRefactor => "breakfs without refactoring",
            Strategy::NoPeers => "breakfs without peers",
            Strategy::NoPrefetch => "breakfs without prefetch",
            Strategy::NoSched => "breakfs without the scheduler",
            Strategy::Hydrate => "breakfs with hydration",
        }
    }

    /// Its name on the command line (`--strategies`).
    pub fn flag(self) -> &'static str {
        match self {
            Strategy::NoRefactor => "no-refactor",
            Strategy::NoPeers => "no-peers",
            Strategy::NoPrefetch => "no-prefetch",
            Strategy::NoSched => "no-sched",
            Strategy::Hydrate => "hydrate",
            Strategy::Estargz => "estargz",
            Strategy::EstargzOptimized => "estargz-optimized",
            s => s.name(),
        }
    }

    /// Every strategy, in the order they run.
    pub const ALL: [Strategy; 9] = [
        Strategy::DockerLike,
        Strategy::Containerd,
        Strategy::Estargz,
        Strategy::EstargzOptimized,
        Strategy::Breakfs,
        Strategy::NoRefactor,
        Strategy::NoPeers,
        Strategy::NoPrefetch,
        Strategy::NoSched,
    ];

    /// A strategy by its flag (`docker-like`, `no-peers`, ...).
    pub fn parse(s: &str) -> Result<Strategy> {
        let known = || Strategy::ALL.into_iter().chain([Strategy::Hydrate]);
        known().find(|x| x.flag() == s).ok_or_else(|| {
            let names: Vec<&str> = known().map(|x| x.flag()).collect();
            anyhow!("unknown strategy {s:?}: {}", names.join(", "))
        })
    }
}

pub const USAGE: &str = "cargo bench --bench testbed -- [OPTIONS]

Replays deployments from the IBM trace sample on K clusters x N nodes and
measures each strategy's time to ready (decision -> the image's command has
run in its rootfs), bytes from the cloud and from peers, and cache use.

  --clusters K          clusters [4]
  --nodes N             nodes per cluster [4]
  --families a,b        corpus families [all: python,postgres,nginx,redis,httpd,node,openjdk,mariadb]
  --deployments D       deployments replayed [32]
  --replay-secs S       the trace's arrivals scaled into S seconds [60]
  --seed S              clients onto clusters [1]
  --cloud-rtt MS        cluster <-> registry round trip [50]
  --cloud-mbit M        cluster <-> registry bandwidth, shared by the cluster [100]
  --peer-rtt MS         node <-> node inside a cluster [1]
  --peer-mbit M         [1000]
  --cross-rtt MS        node <-> node across clusters [20]
  --cross-mbit M        [200]
  --strategies s,t      docker-like,containerd,estargz,estargz-optimized,breakfs,no-refactor,no-peers,
                        no-prefetch,no-sched [all]
                        and hydrate (breakfs whose mounts hydrate in the background, not in the default set)
  --estargz-level L     gzip level of the eStargz conversions, 1-9 [ctr-remote's default, 9]

Needs root (FUSE, overlayfs, chroot), docker-registry, skopeo, umoci,
containerd, runc, ctr-remote (the eStargz baselines: each original converted
per layer by `ctr-remote image convert --estargz --oci`, and by `ctr-remote
image optimize --oci` recording the image's command; both mounted lazily
from the cloud only by `breakfs mount --standalone --no-hydrate`). Ctrl-C stops and cleans up. Writes target/bench-testbed.md and
target/bench-testbed.svg.";

pub fn parse_opts() -> Result<Option<Opts>> {
    let mut o = Opts::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow!("{a} wants a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| anyhow!("{a} wants a number, not {v:?}"))
        };
        match a.as_str() {
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            "--clusters" => o.clusters = num(val()?)? as usize,
            "--nodes" => o.nodes = num(val()?)? as usize,
            "--deployments" => o.deployments = num(val()?)? as usize,
            "--replay-secs" => o.replay_secs = num(val()?)? as f64,
            "--seed" => o.seed = num(val()?)?,
            "--cloud-rtt" => o.cloud_rtt = num(val()?)?,
            "--cloud-mbit" => o.cloud_mbit = num(val()?)?,
            "--peer-rtt" => o.peer_rtt = num(val()?)?,
            "--peer-mbit" => o.peer_mbit = num(val()?)?,
            "--cross-rtt" => o.cross_rtt = num(val()?)?,
            "--cross-mbit" => o.cross_mbit = num(val()?)?,
            "--estargz-level" => {
                let l = num(val()?)?;
                ensure!(
                    (1..=9).contains(&l),
                    "--estargz-level wants 1 to 9, not {l}"
                );
                o.estargz_level = Some(l as u32);
            }
            "--families" => o.families = val()?.split(',').map(String::from).collect(),
            "--strategies" => {
                o.strategies = val()?
                    .split(',')
                    .map(Strategy::parse)
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    ensure!(
        o.clusters > 0 && o.nodes > 0 && o.deployments > 0,
        "--clusters, --nodes and --deployments must be positive"
    );
    Ok(Some(o))
}
