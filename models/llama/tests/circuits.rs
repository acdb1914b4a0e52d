//! Knowledge circuits, the new per-head and MLP-input sites and the logit lens on the tiny
//! LLaMA (GQA: 4 query heads share 2 key/value heads).

use kedit_model_core::testkit::fixture;
use kedit_plugin_api::model_box;

#[test]
fn circuits_sites_and_lens_work_on_the_tiny_llama() {
    let model = kedit_model_llama::open_runtime(fixture("llama").to_str().unwrap(), "cpu").unwrap();
    kedit_circuits::testkit::check_family("llama", true, &mut model_box(model));
}
