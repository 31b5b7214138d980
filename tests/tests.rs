//! Integration tests: one binary, modules inside.

// libtest starts tests in name order, two at a time here: the small
// testbed, the longest test by far, is named to start first so that the
// rest run beside it instead of after it.
#[path = "testbed.rs"]
mod a_testbed;
mod background;
mod bad_input;
mod corpus;
mod crash;
mod credhelper;
mod cri;
mod delta;
mod deploy;
mod hostile;
mod hostile_net;
mod hostile_two;
mod interop_tools;
mod kube;
mod landmark;
mod load;
mod mount;
mod node;
mod oci_io;
mod passthrough;
mod profile;
mod push;
mod readme;
mod refactor;
mod refactor_profile;
mod relay;
mod restart;
mod rollout;
mod sched;
mod security;
mod snapshotter;
mod snapshotter_lazy;
mod snapshotter_status;
mod support;
mod systemd;
mod toc_tail;
