//! Hostile input, round two (issue 22): a manifest that repeats a layer,
//! `umount` of a mount breakfs did not make, a failed extraction, names
//! no path can hold, a TOC too big to use, messages that must name the
//! real cause, and local paths asked for over the network. Each test is
//! the regression test of one defect.
#![allow(clippy::unwrap_used)]

use crate::hostile::Sandbox;
use crate::support::images::{Layer, T, tar_of};

#[test]
fn a_manifest_that_repeats_a_layer_refactors_on_the_first_run() {
    let s = Sandbox::new();
    let tar = tar_of(&[T::Dir("etc/"), T::File("etc/hosts", b"127.0.0.1\n", 0o644)]);
    for n in [2, 10, 49] {
        let layers: Vec<Layer> = (0..n).map(|_| Layer::gzip(tar.clone())).collect();
        let tag = format!("x{n}");
        s.image(&tag, layers);
        // A fresh work directory each time: nothing left by an earlier run.
        s.refactor(&tag).ok_within(256);
        s.pull(&tag, &s.refactored(&tag)).ok_within(128);
        assert_eq!(
            std::fs::read(s.extracted(&tag).join("etc/hosts")).unwrap(),
            b"127.0.0.1\n"
        );
    }
    s.assert_contained();
}
