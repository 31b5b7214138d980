//! Test support: real services and generated fixtures.
#![allow(dead_code)]

pub mod containerd;
pub mod images;
pub mod registry;
pub mod corpus;
pub mod tree;
pub mod measure;
