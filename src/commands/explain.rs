//! `hytrain explain`: what hytrain understood of the job it was started in.

use crate::cluster::{Env, Plan};
use crate::train::config::Origin;

/// Renders the plan as `hytrain explain` prints it: readable text, or one JSON object with `--json`. A collective
/// backend the job names (`HYTRAIN_BACKEND`, a `backend` hyperparameter) is shown with what hytrain uses for it.
pub fn render(plan: &Plan, env: &Env, json: bool) -> String {
    // A bad value of another setting is `hytrain train`'s to report; explain still shows the plan.
    let backend = super::train::layered(plan, env, &Default::default())
        .ok()
        .and_then(|l| Some((l.config.backend.clone(), l.origins.get("backend")?.clone())))
        .filter(|(_, origin)| *origin != Origin::Default);
    if json {
        // A Plan is plain data (strings, numbers, maps): serializing it cannot fail.
        let mut value = serde_json::to_value(plan).expect("a Plan always serializes");
        if let Some((requested, origin)) = &backend {
            value["backend"] = serde_json::json!({
                "requested": requested,
                "from": origin.to_string(),
                "uses": super::train::backend_use(requested),
            });
        }
        serde_json::to_string_pretty(&value).expect("a JSON value always serializes")
    } else {
        let mut text = plan.to_string();
        if let Some((requested, origin)) = &backend {
            text.push_str(&format!("\nbackend: {requested} (from {origin}): {}", super::train::backend_use(requested)));
        }
        text
    }
}
