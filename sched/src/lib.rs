//! The scheduler score service: a kube-scheduler extender that places a
//! pod where its image is cheapest to get (layer locality, measured links,
//! the pod's delay and bandwidth limits) and balanced on CPU and memory.
//!
//! [`types`] holds the extender wire types, [`score`] the pure filtering
//! and scoring over what is known of each node, [`service`] the HTTP
//! extender and the node directory it polls, [`planner`] the prefetch
//! planner, [`k8s`] the Kubernetes glue.

pub mod k8s;
pub mod planner;
pub mod score;
pub mod service;
pub mod types;
