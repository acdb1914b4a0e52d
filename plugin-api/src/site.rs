//! Canonical sites: family-independent names for places in the network. Editors speak only in
//! these names; each model family maps them onto its own tensors.
//!
//! Activation sites (what flows through the network, `[batch, seq, width]`):
//!
//! | name | meaning |
//! |---|---|
//! | `embed` | token embeddings (plus learned positions where the family has them), the input of block 0 |
//! | `layer.{i}.resid_pre` | residual stream entering block i (`layer.0.resid_pre` == `embed`) |
//! | `layer.{i}.resid_post` | residual stream leaving block i |
//! | `layer.{i}.attn_out` | attention output added to the residual |
//! | `layer.{i}.mlp_key` | input of the MLP output projection, after the activation (ROME's k) |
//! | `layer.{i}.mlp_out` | output of the MLP output projection (ROME's v) |
//! | `layer.{i}.attn_z` | input of the attention output projection, `[batch, seq, heads·head_dim]`: head h's slice times its columns of `layer.{i}.attn.o` is head h's output |
//! | `layer.{i}.head_in` | the residual stream as each head of block i sees it, before the pre-attention norm, `[batch, seq, heads·d_model]` (head-major); an intervention here changes the q/k/v input of that head only |
//! | `layer.{i}.attn_probs` | attention probabilities of block i, `[batch, seq, heads·keys]` (query-major; keys = the call's positions): capture only |
//! | `layer.{i}.mlp_in` | the residual stream as block i's MLP sees it, before its norm; an intervention here changes the MLP's input only, not the residual stream |
//! | `final_norm` | output of the final norm, the input of the LM head |
//!
//! Weight sites (always seen as `[out, in]` f32, whatever the checkpoint stores):
//! `layer.{i}.mlp.down`, `layer.{i}.mlp.up`, `layer.{i}.mlp.gate`, `layer.{i}.attn.q`, `.k`, `.v`,
//! `.o`, `embed.weight` (`[vocab, d_model]`), `lm_head` (`[vocab, d_model]`).

use std::fmt;
use std::str::FromStr;

use crate::error::PluginError;

/// An activation site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActSite {
    Embed,
    ResidPre(usize),
    ResidPost(usize),
    AttnOut(usize),
    MlpKey(usize),
    MlpOut(usize),
    AttnZ(usize),
    HeadIn(usize),
    MlpIn(usize),
    AttnProbs(usize),
    FinalNorm,
}

impl ActSite {
    /// The block the site belongs to; `Embed` counts as before block 0, `FinalNorm` after the last.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            ActSite::ResidPre(i)
            | ActSite::ResidPost(i)
            | ActSite::AttnOut(i)
            | ActSite::MlpKey(i)
            | ActSite::MlpOut(i)
            | ActSite::AttnZ(i)
            | ActSite::HeadIn(i)
            | ActSite::MlpIn(i)
            | ActSite::AttnProbs(i) => Some(i),
            ActSite::Embed | ActSite::FinalNorm => None,
        }
    }
}

impl fmt::Display for ActSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActSite::Embed => write!(f, "embed"),
            ActSite::ResidPre(i) => write!(f, "layer.{i}.resid_pre"),
            ActSite::ResidPost(i) => write!(f, "layer.{i}.resid_post"),
            ActSite::AttnOut(i) => write!(f, "layer.{i}.attn_out"),
            ActSite::MlpKey(i) => write!(f, "layer.{i}.mlp_key"),
            ActSite::MlpOut(i) => write!(f, "layer.{i}.mlp_out"),
            ActSite::AttnZ(i) => write!(f, "layer.{i}.attn_z"),
            ActSite::HeadIn(i) => write!(f, "layer.{i}.head_in"),
            ActSite::MlpIn(i) => write!(f, "layer.{i}.mlp_in"),
            ActSite::AttnProbs(i) => write!(f, "layer.{i}.attn_probs"),
            ActSite::FinalNorm => write!(f, "final_norm"),
        }
    }
}

const ACT_HELP: &str =
    "embed, final_norm, layer.N.{resid_pre, resid_post, attn_out, mlp_key, mlp_out, attn_z, head_in, mlp_in, attn_probs}";
const WEIGHT_HELP: &str =
    "embed.weight, lm_head, layer.N.mlp.{down, up, gate}, layer.N.attn.{q, k, v, o}";

fn parse_layer(s: &str, full: &str, help: &str) -> Result<usize, PluginError> {
    s.parse::<usize>().map_err(|_| {
        PluginError::invalid(format!(
            "site '{full}': '{s}' is not a layer number (sites: {help})"
        ))
    })
}

impl FromStr for ActSite {
    type Err = PluginError;
    fn from_str(s: &str) -> Result<Self, PluginError> {
        match s {
            "embed" => return Ok(ActSite::Embed),
            "final_norm" => return Ok(ActSite::FinalNorm),
            _ => {}
        }
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() == 3 && parts[0] == "layer" {
            let i = parse_layer(parts[1], s, ACT_HELP)?;
            let site = match parts[2] {
                "resid_pre" => ActSite::ResidPre(i),
                "resid_post" => ActSite::ResidPost(i),
                "attn_out" => ActSite::AttnOut(i),
                "mlp_key" => ActSite::MlpKey(i),
                "mlp_out" => ActSite::MlpOut(i),
                "attn_z" => ActSite::AttnZ(i),
                "head_in" => ActSite::HeadIn(i),
                "mlp_in" => ActSite::MlpIn(i),
                "attn_probs" => ActSite::AttnProbs(i),
                _ => {
                    return Err(PluginError::invalid(format!(
                        "unknown activation site '{s}' (sites: {ACT_HELP})"
                    )))
                }
            };
            return Ok(site);
        }
        Err(PluginError::invalid(format!(
            "unknown activation site '{s}' (sites: {ACT_HELP})"
        )))
    }
}

/// A weight site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightSite {
    Embed,
    LmHead,
    MlpDown(usize),
    MlpUp(usize),
    MlpGate(usize),
    AttnQ(usize),
    AttnK(usize),
    AttnV(usize),
    AttnO(usize),
}

impl WeightSite {
    pub fn layer(&self) -> Option<usize> {
        match *self {
            WeightSite::MlpDown(i)
            | WeightSite::MlpUp(i)
            | WeightSite::MlpGate(i)
            | WeightSite::AttnQ(i)
            | WeightSite::AttnK(i)
            | WeightSite::AttnV(i)
            | WeightSite::AttnO(i) => Some(i),
            WeightSite::Embed | WeightSite::LmHead => None,
        }
    }
}

impl fmt::Display for WeightSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightSite::Embed => write!(f, "embed.weight"),
            WeightSite::LmHead => write!(f, "lm_head"),
            WeightSite::MlpDown(i) => write!(f, "layer.{i}.mlp.down"),
            WeightSite::MlpUp(i) => write!(f, "layer.{i}.mlp.up"),
            WeightSite::MlpGate(i) => write!(f, "layer.{i}.mlp.gate"),
            WeightSite::AttnQ(i) => write!(f, "layer.{i}.attn.q"),
            WeightSite::AttnK(i) => write!(f, "layer.{i}.attn.k"),
            WeightSite::AttnV(i) => write!(f, "layer.{i}.attn.v"),
            WeightSite::AttnO(i) => write!(f, "layer.{i}.attn.o"),
        }
    }
}

impl FromStr for WeightSite {
    type Err = PluginError;
    fn from_str(s: &str) -> Result<Self, PluginError> {
        match s {
            "embed.weight" => return Ok(WeightSite::Embed),
            "lm_head" => return Ok(WeightSite::LmHead),
            _ => {}
        }
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() == 4 && parts[0] == "layer" {
            let i = parse_layer(parts[1], s, WEIGHT_HELP)?;
            let site = match (parts[2], parts[3]) {
                ("mlp", "down") => Some(WeightSite::MlpDown(i)),
                ("mlp", "up") => Some(WeightSite::MlpUp(i)),
                ("mlp", "gate") => Some(WeightSite::MlpGate(i)),
                ("attn", "q") => Some(WeightSite::AttnQ(i)),
                ("attn", "k") => Some(WeightSite::AttnK(i)),
                ("attn", "v") => Some(WeightSite::AttnV(i)),
                ("attn", "o") => Some(WeightSite::AttnO(i)),
                _ => None,
            };
            if let Some(site) = site {
                return Ok(site);
            }
        }
        Err(PluginError::invalid(format!(
            "unknown weight site '{s}' (sites: {WEIGHT_HELP})"
        )))
    }
}

/// Expands a layer template such as `"layer.{}.mlp.down"` for layer `i`.
pub fn layer_site(template: &str, i: usize) -> String {
    template.replace("{}", &i.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_round_trip_through_their_names() {
        for s in [
            ActSite::Embed,
            ActSite::FinalNorm,
            ActSite::ResidPre(3),
            ActSite::ResidPost(0),
            ActSite::AttnOut(7),
            ActSite::MlpKey(12),
            ActSite::MlpOut(29),
            ActSite::AttnZ(4),
            ActSite::HeadIn(2),
            ActSite::MlpIn(1),
            ActSite::AttnProbs(0),
        ] {
            assert_eq!(s.to_string().parse::<ActSite>().unwrap(), s);
        }
        for w in [
            WeightSite::Embed,
            WeightSite::LmHead,
            WeightSite::MlpDown(5),
            WeightSite::MlpUp(1),
            WeightSite::MlpGate(2),
            WeightSite::AttnQ(0),
            WeightSite::AttnK(0),
            WeightSite::AttnV(0),
            WeightSite::AttnO(9),
        ] {
            assert_eq!(w.to_string().parse::<WeightSite>().unwrap(), w);
        }
    }

    #[test]
    fn bad_site_names_explain_what_is_allowed() {
        let e = "layer.x.mlp_out".parse::<ActSite>().unwrap_err();
        assert!(e.message.contains("not a layer number"), "{e}");
        let e = "layer.1.mlp_mid".parse::<ActSite>().unwrap_err();
        assert!(e.message.contains("resid_pre"), "{e}");
        let e = "layer.1.mlp.fc".parse::<WeightSite>().unwrap_err();
        assert!(e.message.contains("layer.N.mlp"), "{e}");
    }
}
