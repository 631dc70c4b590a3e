//! `check --image REF`: the workloads a push of REF would restart, as JSON.

use serde::Serialize;

use crate::image::ImageRef;
use crate::workload::WorkloadRef;

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub image: String,
    pub source: &'static str,
    pub workloads: Vec<WorkloadRef>,
}

impl CheckReport {
    pub fn new(image: &ImageRef, source: &'static str, workloads: &[WorkloadRef]) -> Self {
        Self {
            image: image.to_string(),
            source,
            workloads: workloads.to_vec(),
        }
    }
}
