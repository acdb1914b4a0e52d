//! End to end: `kedit generate --model shared/fixtures/{qwen2,qwen3} --ids <gen.prompt_ids>
//! --show-ids` through the built host and this plugin (from target/release) reproduces
//! transformers' greedy ids. Runs when `target/release/kedit` and the plugin are built.

use kedit_model_core::testkit::*;

#[test]
fn kedit_generate_reproduces_the_greedy_ids() {
    for family in ["qwen2", "qwen3"] {
        let exp = load_expected(fixture(family).join("expected.safetensors"));
        let prompt = exp["gen.prompt_ids"].ids();
        let want = exp["gen.new_token_ids"].ids();
        let Some(got) = kedit_generate_ids(&fixture(family), "kedit_model_qwen", &prompt, 10)
        else {
            return;
        };
        // These configs name no EOS: all 10 tokens come back.
        assert_eq!(got, want, "{family}");
    }
}
