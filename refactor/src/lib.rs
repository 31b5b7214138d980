//! Image refactoring: the layer planner and the eStargz layer writer.

mod error;

pub use error::{Error, Result};
