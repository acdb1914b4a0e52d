//! End to end: `kedit generate --model shared/fixtures/gpt2 --ids <gen.prompt_ids> --show-ids`
//! through the built host and this plugin (from target/release, the default plugin dir)
//! reproduces transformers' greedy ids. Runs when `target/release/kedit` and the plugin are
//! built (`cargo build --release` builds both).

use kedit_model_core::testkit::*;

#[test]
fn kedit_generate_reproduces_the_greedy_ids() {
    let exp = load_expected(fixture("gpt2").join("expected.safetensors"));
    let prompt = exp["gen.prompt_ids"].ids();
    let want = exp["gen.new_token_ids"].ids();
    let Some(got) = kedit_generate_ids(&fixture("gpt2"), "kedit_model_gpt2", &prompt, 10) else {
        return;
    };
    // Generation stops at EOS (511), so compare up to and including it.
    let stop = want
        .iter()
        .position(|&t| t == 511)
        .map_or(want.len(), |p| p + 1);
    assert_eq!(got, want[..stop]);
}
