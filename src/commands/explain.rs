//! `hytrain explain`: what hytrain understood of the job it was started in.

use crate::cluster::Plan;

/// Renders the plan as `hytrain explain` prints it: readable text, or one JSON object with `--json`.
pub fn render(plan: &Plan, json: bool) -> String {
    if json {
        // A Plan is plain data (strings, numbers, maps): serializing it cannot fail.
        serde_json::to_string_pretty(plan).expect("a Plan always serializes")
    } else {
        plan.to_string()
    }
}
