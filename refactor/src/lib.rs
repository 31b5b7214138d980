//! Image refactoring: the layer planner and the eStargz layer writer.

pub mod delta;
mod dpkg;
mod error;
mod estargz;
mod pipeline;
mod plan;

pub use dpkg::PackageDb;
pub use error::{Error, Result};
pub use estargz::{ContentSource, WriterOptions, WrittenLayer, write_layer};
pub use pipeline::{
    ImageReport, LoadedImage, NoProgress, Progress, RefactorOptions, ReportTable, load_image,
    refactor,
};
pub use plan::{
    ImagePlan, LayerSource, Plan, PlanImage, PlanLayer, PlanOptions, PublishedLayer, plan,
};
