//! The `breakfs` command.

fn main() {}
