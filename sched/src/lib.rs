//! The scheduler score service: a kube-scheduler extender (issue: scheduler).
