//! Image refactoring: the layer planner and the eStargz layer writer.
