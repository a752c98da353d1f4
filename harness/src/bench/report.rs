//! What every scenario produces: rows of (scenario, metric, kvcoord,
//! baseline, unit), the plan that sizes a run, and percentiles. It must never
//! run a scenario.

use std::time::Duration;

pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) metric: &'static str,
    pub(crate) kvcoord: f64,
    pub(crate) baseline_name: &'static str,
    pub(crate) baseline: f64,
    pub(crate) unit: &'static str,
}

pub(crate) struct Plan {
    pub(crate) samples: usize,
    pub(crate) pipeline: Duration,
    pub(crate) timed_rounds: u64,
    pub(crate) cycles: usize,
    pub(crate) index_entries: usize,
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// JSON without another dependency: the rows are flat and their strings plain.
pub(crate) fn rows_as_json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"scenario\":{:?},\"metric\":{:?},\"kvcoord\":{},\"baseline_name\":{:?},\"baseline\":{},\"unit\":{:?}}}",
                r.scenario, r.metric, r.kvcoord, r.baseline_name, r.baseline, r.unit
            )
        })
        .collect();
    format!("[{}]\n", items.join(","))
}
