//! Test support: real services and generated fixtures.
#![allow(dead_code)]

pub mod containerd;
pub mod corpus;
pub mod crashloop;
pub mod images;
pub mod load;
pub mod measure;
pub mod memo;
pub mod proxy;
pub mod registry;
pub mod tree;
