//! Integration tests: one binary, modules inside.

mod bad_input;
mod corpus;
mod crash;
mod credhelper;
mod cri;
mod hostile;
mod hostile_net;
mod hostile_two;
mod interop_tools;
mod kube;
mod load;
mod mount;
mod node;
mod oci_io;
mod readme;
mod refactor;
mod relay;
mod rollout;
mod sched;
mod security;
mod snapshotter;
mod support;
mod systemd;
mod testbed;
