//! Knowledge circuits, the new per-head and MLP-input sites and the logit lens on the tiny
//! Baichuan2-7B (RoPE) and Baichuan2-13B (ALiBi, 6 heads).

use kedit_model_core::testkit::fixture;
use kedit_plugin_api::model_box;

#[test]
fn circuits_sites_and_lens_work_on_the_tiny_baichuans() {
    for name in ["baichuan7b", "baichuan13b"] {
        let path = fixture(name);
        let model =
            kedit_model_baichuan::open_runtime(path.to_str().unwrap(), "cpu", None).unwrap();
        kedit_circuits::testkit::check_family(name, true, &mut model_box(model));
    }
}
