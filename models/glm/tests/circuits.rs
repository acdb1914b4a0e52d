//! Knowledge circuits, the new per-head and MLP-input sites and the logit lens on the tiny GLM,
//! GLM-4-0414 (sandwich norms: block outputs are normalised before the residual stream, so edge
//! patching is only approximate there and the checks say so) and ChatGLM2.

use kedit_model_core::testkit::fixture;
use kedit_plugin_api::model_box;

#[test]
fn circuits_sites_and_lens_work_on_the_tiny_glm_family() {
    for (name, additive) in [("glm", true), ("glm4", false)] {
        let model = kedit_model_glm::open_glm(fixture(name).to_str().unwrap(), "cpu").unwrap();
        kedit_circuits::testkit::check_family(name, additive, &mut model_box(model));
    }
    let model =
        kedit_model_glm::open_chatglm(fixture("chatglm2").to_str().unwrap(), "cpu").unwrap();
    kedit_circuits::testkit::check_family("chatglm2", true, &mut model_box(model));
}
