//! Fixtures made once per test binary: a value per key, made by the first
//! test that asks and shared with every later one (tests asking meanwhile
//! wait for it). For pure functions of their key only (the tree `umoci
//! unpack` makes of an image, an image's refactoring into an empty
//! destination): a test gets exactly what it would have made itself.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};

/// Values by key, each made at most once.
pub struct Memo<K, V: 'static>(OnceLock<Mutex<HashMap<K, &'static OnceLock<V>>>>);

impl<K: Eq + Hash, V: 'static> Memo<K, V> {
    pub const fn new() -> Self {
        Memo(OnceLock::new())
    }

    /// The value of `key`, made by `make` unless made before. Only the
    /// slot of `key` is held while `make` runs: other keys go on.
    pub fn get(&self, key: K, make: impl FnOnce() -> V) -> &'static V {
        let slot: &'static OnceLock<V> = {
            let mut map = self
                .0
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            map.entry(key)
                .or_insert_with(|| Box::leak(Box::new(OnceLock::new())))
        };
        slot.get_or_init(make)
    }
}
