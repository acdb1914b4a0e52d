//! Knowledge circuits, the new per-head and MLP-input sites and the logit lens on the tiny
//! GPT-2 (learned positions, LayerNorm, biases everywhere).

use kedit_model_core::testkit::fixture;
use kedit_plugin_api::model_box;

#[test]
fn circuits_sites_and_lens_work_on_the_tiny_gpt2() {
    let model = kedit_model_gpt2::open_runtime(fixture("gpt2").to_str().unwrap(), "cpu").unwrap();
    kedit_circuits::testkit::check_family("gpt2", true, &mut model_box(model));
}
