//! The tiny random Baichuan2-7B (RoPE) and Baichuan2-13B (ALiBi, 6 heads: the slope formula's
//! non-power-of-two branch) remote-code checkpoints (shared/fixtures/baichuan7b, baichuan13b):
//! exactness against the reference with NormHead, KV-cached decoding (ALiBi with the cache),
//! the slopes, NormHead semantics (raw weight at the site, normalised at use, the cache follows
//! writes, the v1 plain head), gradients (ALiBi and NormHead paths included), export with the
//! re-fused `W_pack`, the kedit binary, and broken checkpoints.

#[path = "../../glm/tests/common/mod.rs"]
mod common;

use common::*;
use kedit_model_core::arch::baichuan::{self, Baichuan, BaichuanConfig, Positions};
use kedit_model_core::checkpoint::JsonFile;
use kedit_model_core::engine::alibi;
use kedit_model_core::Runtime;

fn open(name: &str) -> Runtime<Baichuan> {
    kedit_model_baichuan::open_runtime(fixture(name).to_str().unwrap(), "cpu", None)
        .expect("the fixture loads")
}

#[test]
fn baichuan7b_matches_the_reference() {
    let model = open("baichuan7b");
    assert!(matches!(model.arch().config.positions, Positions::Rope(_)));
    assert!(model.arch().config.norm_head);
    check_reference(&model, "baichuan7b", 176);
}

#[test]
fn baichuan13b_matches_the_reference_with_alibi() {
    let model = open("baichuan13b");
    assert!(model.arch().config.norm_head);
    check_reference(&model, "baichuan13b", 176);
}

#[test]
fn alibi_slopes_match_the_reference() {
    let fx = TinyFixture::new("baichuan13b", 3, 176);
    let want = fx.exp["alibi_slopes"].f32s();
    assert_eq!(alibi::slopes(6), want);
    match &open("baichuan13b").arch().config.positions {
        Positions::Alibi(s) => assert_eq!(s, &want),
        other => panic!("baichuan13b should use ALiBi, not {other:?}"),
    }
}

#[test]
fn norm_head_reads_and_writes_the_raw_weight_and_normalises_at_use() {
    for name in ["baichuan7b", "baichuan13b"] {
        let mut model = open(name);
        let stored = read_safetensors(&fixture(name).join("model.safetensors"));
        let raw = model.read_weight("lm_head").unwrap();
        assert_eq!(
            raw.as_slice(),
            stored["lm_head.weight"].1.as_slice(),
            "{name}: raw weight"
        );

        // The head the forward applies is the reference's normalised one.
        let fx = TinyFixture::new(name, 3, 176);
        let want = fx.exp["debug.lm_head_weight_normalized"].f32s();
        let t =
            candle_core::Tensor::from_slice(raw.as_slice(), raw.dims(), &candle_core::Device::Cpu)
                .unwrap();
        let got: Vec<f32> = baichuan::normalize_rows(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_abs_diff(&got, &want);
        eprintln!("{name}: normalised head max abs diff {d:e}");
        assert!(d < 1e-6, "{name}: normalised head differs by {d}");

        // Writing the head takes effect (the cached normalised head follows the write): rows
        // rotated by one give logits rotated by one.
        let before = probe_logits(&model);
        let (v, h) = (raw.dims()[0], raw.dims()[1]);
        let mut rotated = vec![0f32; v * h];
        for r in 0..v {
            let from = (r + 1) % v;
            rotated[r * h..(r + 1) * h].copy_from_slice(&raw.as_slice()[from * h..(from + 1) * h]);
        }
        let mark = model.journal_mark().unwrap();
        model
            .write_weight("lm_head", &Tensor::new(&[v, h], rotated).unwrap())
            .unwrap();
        let after = probe_logits(&model);
        let positions = after.numel() / v;
        for p in 0..positions {
            for r in 0..v {
                let (a, b) = (
                    after.as_slice()[p * v + r],
                    before.as_slice()[p * v + (r + 1) % v],
                );
                assert!(
                    (a - b).abs() < 1e-5,
                    "{name}: rotated head, position {p} row {r}"
                );
            }
        }
        // Scaling a row does nothing under NormHead.
        model.journal_rollback(mark).unwrap();
        assert_eq!(probe_logits(&model).as_slice(), before.as_slice());
        let scaled: Vec<f32> = raw.as_slice().iter().map(|x| x * 3.0).collect();
        model
            .write_weight("lm_head", &Tensor::new(&[v, h], scaled).unwrap())
            .unwrap();
        let d = max_abs_diff(probe_logits(&model).as_slice(), before.as_slice());
        assert!(
            d < 1e-4,
            "{name}: a scaled NormHead changed the logits by {d}"
        );

        // Without NormHead (the option), the logits differ: the plain head is used.
        let plain =
            kedit_model_baichuan::open_runtime(fixture(name).to_str().unwrap(), "cpu", Some(false))
                .unwrap();
        let d = max_abs_diff(probe_logits(&plain).as_slice(), before.as_slice());
        assert!(
            d > 0.1,
            "{name}: the plain head gives the same logits ({d})"
        );
    }
}

fn config_with(name: &str, edit: impl Fn(&mut serde_json::Value)) -> BaichuanConfig {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    edit(&mut v);
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    BaichuanConfig::from_hf(&JsonFile::read(&path).unwrap(), None).unwrap()
}

#[test]
fn the_head_and_position_scheme_follow_the_config() {
    // Baichuan2 (BaichuanForCausalLM, vocab 125696 or the fixture's): NormHead.
    assert!(config_with("baichuan7b", |c| c["vocab_size"] = 125696.into()).norm_head);
    // Baichuan-7B v1 (BaiChuanForCausalLM): plain head, RoPE.
    let v1 = config_with("baichuan7b", |c| {
        c["architectures"] = serde_json::json!(["BaiChuanForCausalLM"]);
        c["vocab_size"] = 64000.into();
    });
    assert!(!v1.norm_head);
    assert!(matches!(v1.positions, Positions::Rope(_)));
    // Baichuan-13B v1 (BaichuanForCausalLM, vocab 64000, no max_position_embeddings): plain
    // head, ALiBi.
    let v1_13b = config_with("baichuan13b", |c| c["vocab_size"] = 64000.into());
    assert!(!v1_13b.norm_head);
    assert!(matches!(v1_13b.positions, Positions::Alibi(_)));
    assert_eq!(v1_13b.dims.max_positions, 128);
    // 40 heads (Baichuan2-13B): 32 + 8 interleaved slopes.
    let big = config_with("baichuan13b", |c| {
        c["num_attention_heads"] = 40.into();
        c["hidden_size"] = 5120.into();
    });
    match big.positions {
        Positions::Alibi(s) => assert_eq!(s.len(), 40),
        other => panic!("{other:?}"),
    }
}

const SITE_GRADS: &[&str] = &[
    "layer.1.mlp.down",
    "layer.1.mlp.gate",
    "layer.0.attn.q",
    "layer.1.attn.k",
    "layer.2.attn.v",
    "layer.2.attn.o",
];

#[test]
fn baichuan7b_gradients_match_finite_differences() {
    let mut model = open("baichuan7b");
    check_gradients(&mut model, 64, 176, SITE_GRADS);
    check_norm_head_gradient(&mut model, 64, 176);
}

#[test]
fn baichuan13b_gradients_match_finite_differences_through_alibi() {
    let mut model = open("baichuan13b");
    // Layer 0's q is checked below with smaller steps: at the testkit's step (1e-2) its
    // central difference is still 0.6 % off from curvature alone.
    let sites: Vec<&str> = SITE_GRADS
        .iter()
        .map(|&s| {
            if s == "layer.0.attn.q" {
                "layer.1.attn.q"
            } else {
                s
            }
        })
        .collect();
    check_gradients(&mut model, 96, 176, &sites);
    check_norm_head_gradient(&mut model, 96, 176);
}

/// The W_pack q slice of layer 0 under ALiBi: the central difference converges to the analytic
/// derivative as the step shrinks (error ∝ eps²), so the gradient is exact.
#[test]
fn baichuan13b_layer0_q_gradient_converges_under_finite_differences() {
    let mut model = open("baichuan13b");
    let site = "layer.0.attn.q";
    let case = GradientCase::standard(96, 176, &[site]);
    let g = case.gradient(&model);
    let sg = &g.site_grads[0];
    let w = model.read_weight(site).unwrap();
    let (out, inp) = (w.dims()[0], w.dims()[1]);
    let (x, gy) = (sg.input.as_slice(), sg.output_grad.as_slice());
    let mut dw = vec![0f64; out * inp];
    for t in 0..x.len() / inp {
        for o in 0..out {
            for i in 0..inp {
                dw[o * inp + i] += gy[t * out + o] as f64 * x[t * inp + i] as f64;
            }
        }
    }
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let r: Vec<f64> = pseudo_random(2000, dw.len(), 1.0)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (gn, rn) = (norm(&dw), norm(&r));
    let dir: Vec<f64> = dw.iter().zip(&r).map(|(a, b)| a / gn + b / rn).collect();
    let dn = norm(&dir);
    let dir: Vec<f32> = dir.iter().map(|v| (v / dn) as f32).collect();
    let analytic: f64 = dw.iter().zip(&dir).map(|(a, &b)| a * b as f64).sum();
    let mut errors = Vec::new();
    for eps in [1e-2, 5e-3, 2.5e-3] {
        let mut loss = |sign: f64| {
            let mark = model.journal_mark().unwrap();
            let mut v = w.clone();
            for (a, d) in v.as_mut_slice().iter_mut().zip(&dir) {
                *a += (sign * eps) as f32 * d;
            }
            model.write_weight(site, &v).unwrap();
            let l = case.loss_by_forward(&model, case.params.clone());
            model.journal_rollback(mark).unwrap();
            l
        };
        let fd = (loss(1.0) - loss(-1.0)) / (2.0 * eps);
        let rel = (fd - analytic).abs() / analytic.abs();
        eprintln!(
            "eps {eps}: analytic {analytic:+.6e}  finite difference {fd:+.6e}  rel {rel:.2e}"
        );
        errors.push(rel);
    }
    assert!(analytic.abs() > 1.0);
    assert!(errors[2] < 1e-3, "{errors:?}");
    assert!(
        errors[0] > 3.0 * errors[1] && errors[1] > 3.0 * errors[2],
        "{errors:?}"
    );
}

#[test]
fn export_round_trips_with_the_re_fused_w_pack() {
    for (name, dm) in [("baichuan7b", 64), ("baichuan13b", 96)] {
        let pack = |i: usize| -> &'static str {
            match i {
                0 => "model.layers.0.self_attn.W_pack.weight",
                1 => "model.layers.1.self_attn.W_pack.weight",
                _ => "model.layers.2.self_attn.W_pack.weight",
            }
        };
        let writes = vec![
            // Rows [q | k | v], d_model each.
            FusedWrite {
                site: "layer.1.attn.k",
                hf: pack(1),
                first_row: dm,
            },
            FusedWrite {
                site: "layer.0.attn.v",
                hf: pack(0),
                first_row: 2 * dm,
            },
            FusedWrite {
                site: "layer.2.attn.q",
                hf: pack(2),
                first_row: 0,
            },
            FusedWrite {
                site: "layer.1.mlp.down",
                hf: "model.layers.1.mlp.down_proj.weight",
                first_row: 0,
            },
            // The raw head is exported as stored (scaled rows: the same NormHead logits).
            FusedWrite {
                site: "lm_head",
                hf: "lm_head.weight",
                first_row: 0,
            },
        ];
        let mut model = open(name);
        check_fused_export(&mut model, name, &writes, |dir| {
            kedit_model_baichuan::open_runtime(dir.to_str().unwrap(), "cpu", None).unwrap()
        });
    }
}

#[test]
fn facts_and_sites() {
    for (name, dm) in [("baichuan7b", 64u32), ("baichuan13b", 96)] {
        let model = open(name);
        let f = model.facts().unwrap();
        assert_eq!(f.family.as_str(), "baichuan");
        assert_eq!((f.n_layers, f.d_model, f.d_ff), (3, dm, 176));
        assert_eq!((f.n_heads, f.head_dim), (dm / 16, 16));
        assert_eq!(f.n_kv_heads, f.n_heads);
        assert_eq!(f.max_positions, 128);
        let sites: Vec<&str> = f.weight_sites.iter().map(|s| s.as_str()).collect();
        assert_eq!(sites.len(), 2 + 3 * 7, "{sites:?}");
        let dm = dm as usize;
        assert_eq!(
            model.read_weight("layer.0.attn.k").unwrap().dims(),
            vec![dm, dm]
        );
    }
}

#[test]
fn kedit_generate_reproduces_the_greedy_ids() {
    check_kedit_generate("baichuan7b");
    check_kedit_generate("baichuan13b");
}

#[test]
fn the_plugin_probes_and_opens_through_the_abi() {
    let p = |name: &str| kedit_model_baichuan::probe(fixture(name).to_str().unwrap()).unwrap();
    assert_eq!(p("baichuan7b").as_deref(), Some("baichuan"));
    assert_eq!(p("baichuan13b").as_deref(), Some("baichuan"));
    assert_eq!(p("llama"), None);
    assert_eq!(p("chatglm2"), None);
    let request = |options: &str, family: Option<&str>| kedit_plugin_api::OpenRequest {
        path: fixture("baichuan13b").to_str().unwrap().into(),
        family: family.map(Into::into).into(),
        device: "cpu".into(),
        options_json: options.into(),
    };
    let m = kedit_model_baichuan::open(&request("{}", Some("baichuan"))).unwrap();
    assert_eq!(m.facts().unwrap().d_model, 96);
    kedit_model_baichuan::open(&request(r#"{"norm_head": false}"#, None)).unwrap();
    let e = kedit_model_baichuan::open(&request(r#"{"norm_head": 1}"#, None))
        .err()
        .unwrap();
    assert!(e.message.contains("norm_head"), "{e}");
    let e = kedit_model_baichuan::open(&request(r#"{"alibi": true}"#, None))
        .err()
        .unwrap();
    assert!(
        e.message.contains("alibi") && e.message.contains("norm_head"),
        "{e}"
    );
    assert!(kedit_model_baichuan::open(&request("{}", Some("glm"))).is_err());
}

#[test]
fn broken_checkpoints_name_the_file_and_the_tensor_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let open_dir = || kedit_model_baichuan::open_runtime(dir.path().to_str().unwrap(), "cpu", None);
    let pack = "model.layers.1.self_attn.W_pack.weight";
    broken_copy("baichuan13b", dir.path(), |_| {}, |n| n != pack);
    let e = open_dir().err().unwrap().to_string();
    eprintln!("{e}");
    assert!(e.contains(pack) && e.contains("model.safetensors"), "{e}");

    broken_copy(
        "baichuan7b",
        dir.path(),
        |c| c["hidden_size"] = 96.into(),
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    eprintln!("{e}");
    assert!(
        e.contains("model.embed_tokens.weight")
            && e.contains("[512, 64]")
            && e.contains("[512, 96]"),
        "{e}"
    );

    broken_copy(
        "baichuan7b",
        dir.path(),
        |c| c["intermediate_size"] = 100.into(),
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(
        e.contains("gate_proj.weight") && e.contains("[176, 64]"),
        "{e}"
    );

    broken_copy(
        "baichuan7b",
        dir.path(),
        |c| {
            c.as_object_mut().unwrap().remove("num_attention_heads");
        },
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(
        e.contains("num_attention_heads") && e.contains("config.json"),
        "{e}"
    );

    broken_copy(
        "baichuan7b",
        dir.path(),
        |c| c["hidden_act"] = "gelu".into(),
        |_| true,
    );
    let e = open_dir().err().unwrap().to_string();
    assert!(e.contains("gelu"), "{e}");
}

/// Through the kedit binary: a checkpoint no plugin recognises, and a tensor of the wrong
/// shape, fail with messages that name the checkpoint (and the tensor).
#[test]
fn kedit_reports_unrecognised_and_mismatched_checkpoints() {
    let kedit = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/release/kedit"
    ));
    assert!(kedit.is_file(), "run `cargo build --release` first");
    let run = |dir: &std::path::Path| {
        let out = std::process::Command::new(&kedit)
            .args(["generate", "--model"])
            .arg(dir)
            .args(["--ids", "1,2", "--max-new-tokens", "1", "--show-ids"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    broken_copy(
        "baichuan7b",
        dir.path(),
        |c| {
            c["model_type"] = "mystery".into();
            c["architectures"] = serde_json::json!(["MysteryForCausalLM"]);
        },
        |_| true,
    );
    let e = run(dir.path());
    eprintln!("{e}");
    assert!(e.contains("no model family plugin recognises"), "{e}");
    assert!(e.contains(&dir.path().display().to_string()), "{e}");

    broken_copy(
        "baichuan7b",
        dir.path(),
        |c| c["intermediate_size"] = 100.into(),
        |_| true,
    );
    let e = run(dir.path());
    eprintln!("{e}");
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.0.mlp.gate_proj.weight"),
        "{e}"
    );
}
