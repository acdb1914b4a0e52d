//! Knowledge circuits, the new per-head and MLP-input sites and the logit lens on the tiny
//! Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms, head_dim ≠ d/heads).

use kedit_model_core::testkit::fixture;
use kedit_plugin_api::model_box;

#[test]
fn circuits_sites_and_lens_work_on_the_tiny_qwen2_and_qwen3() {
    for name in ["qwen2", "qwen3"] {
        let model = kedit_model_qwen::open_runtime(fixture(name).to_str().unwrap(), "cpu").unwrap();
        kedit_circuits::testkit::check_family(name, true, &mut model_box(model));
    }
}
