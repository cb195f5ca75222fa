//! `--extras-check`: the logit processing and log probabilities of a step (issue 13) against
//! the prompt's own logits. Each case is one request alone in its step whose prompt is one token,
//! so its logits are bit for bit the reference row `prompt_logits` returns for that token (the
//! same kernels on the same one-row shapes): the expected tokens and log probabilities then
//! follow exactly from the reference row, and the check can be strict. Log probabilities are
//! compared within 1e-4 (f32 on the device against f64 here). The sampling filters draw with
//! many seeds in one step: 16 rows, or with FP8 weights 8 (the GEMV's rows, whose activations are
//! not quantized as the one-row reference's are not; above 8 rows they would be, and the step's
//! logits would differ from the reference by FP8 rounding).

use tpserve_proto as pb;
use tpserve_worker::thread_group::ThreadGroup;

/// Largest |difference| of a log probability from the reference.
const TOLERANCE: f32 = 1e-4;

/// The reference row and what follows from it.
struct Reference {
    row: Vec<f32>,
    /// Token ids, most likely first (lowest id first on ties).
    order: Vec<u32>,
    lse: f64,
}

impl Reference {
    fn new(row: Vec<f32>) -> Self {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)));
        let max = row[order[0] as usize];
        let lse = f64::from(max)
            + row
                .iter()
                .map(|&x| f64::from(x - max).exp())
                .sum::<f64>()
                .ln();
        Self { row, order, lse }
    }

    fn logprob(&self, token: u32) -> f32 {
        (f64::from(self.row[token as usize]) - self.lse) as f32
    }

    fn rank(&self, token: u32) -> u32 {
        let x = self.row[token as usize];
        1 + self.row.iter().filter(|&&y| y > x).count() as u32
    }

    /// `sampled`'s log probabilities must be the reference's for `token` with `top` top tokens.
    fn check(&self, lp: Option<&pb::TokenLogprobs>, token: u32, top: usize) -> Result<(), String> {
        let lp = lp.ok_or("no log probabilities")?;
        if lp.token_id != token || lp.rank != self.rank(token) {
            return Err(format!(
                "token {} rank {} (expected {token} rank {})",
                lp.token_id,
                lp.rank,
                self.rank(token)
            ));
        }
        if (lp.logprob - self.logprob(token)).abs() > TOLERANCE {
            return Err(format!(
                "logprob {} (expected {})",
                lp.logprob,
                self.logprob(token)
            ));
        }
        if lp.top_token_ids != self.order[..top] {
            return Err(format!(
                "top tokens {:?} (expected {:?})",
                lp.top_token_ids,
                &self.order[..top]
            ));
        }
        for (&t, &x) in lp.top_token_ids.iter().zip(&lp.top_logprobs) {
            if (x - self.logprob(t)).abs() > TOLERANCE {
                return Err(format!(
                    "top token {t}: logprob {x} (expected {})",
                    self.logprob(t)
                ));
            }
        }
        Ok(())
    }
}

/// One request of a case.
#[derive(Clone, Default)]
struct Ask {
    sampling: pb::SamplingParams,
    controls: Option<pb::LogitsControls>,
    logprobs: Option<u32>,
    allowed: Option<Vec<u32>>,
}

fn greedy() -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        seed: None,
    }
}

/// A bitmask over `vocab` tokens allowing `tokens`.
fn mask(vocab: usize, tokens: &[u32]) -> Vec<u32> {
    let mut words = vec![0u32; vocab.div_ceil(32)];
    for &t in tokens {
        words[t as usize / 32] |= 1 << (t % 32);
    }
    words
}

/// Runs `asks` as requests of one step on the one-token prompt `token` (each in its own blocks),
/// frees them, and returns rank 0's sampled tokens in order.
fn run_step(
    group: &ThreadGroup,
    token: u32,
    asks: &[Ask],
    num_blocks: usize,
) -> anyhow::Result<Vec<pb::SampledToken>> {
    anyhow::ensure!(asks.len() <= num_blocks, "the cache is too small");
    let ids: Vec<u64> = (0..asks.len() as u64).map(|i| 5000 + i).collect();
    let plan = pb::StepPlan {
        step_id: 1,
        new_sequences: asks
            .iter()
            .zip(&ids)
            .enumerate()
            .map(|(i, (a, &id))| pb::NewSequence {
                sequence_id: id,
                token_ids: vec![token],
                sampling: Some(a.sampling),
                block_ids: vec![i as u32],
                num_computed_tokens: 0,
                num_scheduled_tokens: 1,
                num_prompt_tokens: 1,
                controls: a.controls.clone(),
                logprobs: a.logprobs.map(|k| pb::LogprobsRequest {
                    sample: Some(k),
                    prompt: None,
                }),
                ..Default::default()
            })
            .collect(),
        token_masks: asks
            .iter()
            .zip(&ids)
            .filter_map(|(a, &id)| {
                a.allowed.clone().map(|allowed| pb::TokenMask {
                    sequence_id: id,
                    allowed,
                })
            })
            .collect(),
        ..Default::default()
    };
    let answers = group.on_all(move |_, r| r.step(&plan).map(|o| o.tokens))?;
    let free = pb::StepPlan {
        step_id: 2,
        freed_sequence_ids: ids,
        ..Default::default()
    };
    group.on_all(move |_, r| r.step(&free))?;
    let tokens = answers.into_iter().next().unwrap_or_default();
    anyhow::ensure!(tokens.len() == asks.len(), "{} tokens back", tokens.len());
    Ok(tokens)
}

/// The check (see the module comment); prints PASS or fails with every case that did not hold.
pub fn extras_check(
    group: &ThreadGroup,
    token: u32,
    num_blocks: usize,
    fp8: bool,
) -> anyhow::Result<()> {
    let row = group
        .on_all(move |_, r| r.prompt_logits_with_adapter(&[token], 1, None))?
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("rank 0 returned no logits"))?;
    let vocab = row.len();
    let reference = Reference::new(row);
    let o = &reference.order;
    let top = tpserve_worker::sampler::logprobs::MAX_TOP_LOGPROBS;
    let mut failures = Vec::new();
    let mut report = |name: &str, result: Result<(), String>| match result {
        Ok(()) => eprintln!("extras {name}: ok"),
        Err(e) => failures.push(format!("{name}: {e}")),
    };
    let alone = |ask: Ask| -> anyhow::Result<pb::SampledToken> {
        Ok(run_step(group, token, &[ask], num_blocks)?.remove(0))
    };
    let expect = |got: &pb::SampledToken, token: u32| {
        if got.token_id == token {
            Ok(())
        } else {
            Err(format!("sampled {} (expected {token})", got.token_id))
        }
    };

    // Log probabilities alone: the greedy token and the top 20 of the raw row.
    let got = alone(Ask {
        sampling: greedy(),
        logprobs: Some(top as u32),
        ..Ask::default()
    })?;
    report(
        "logprobs 20",
        expect(&got, o[0]).and_then(|_| reference.check(got.logprobs.as_ref(), o[0], top)),
    );
    // A bias lifts the 100th token over every other; its log probability stays the raw one.
    let lifted = o[99];
    let got = alone(Ask {
        sampling: greedy(),
        controls: Some(pb::LogitsControls {
            logit_bias: vec![pb::TokenBias {
                token_id: lifted,
                bias: 1000.0,
            }],
            ..Default::default()
        }),
        logprobs: Some(3),
        ..Ask::default()
    })?;
    report(
        "logit_bias",
        expect(&got, lifted).and_then(|_| reference.check(got.logprobs.as_ref(), lifted, 3)),
    );
    // A one-token bad word bans the greedy token; min_tokens bans its stop tokens.
    let got = alone(Ask {
        sampling: greedy(),
        controls: Some(pb::LogitsControls {
            bad_words: vec![pb::TokenSequence {
                token_ids: vec![o[0]],
            }],
            ..Default::default()
        }),
        ..Ask::default()
    })?;
    report("bad_words", expect(&got, o[1]));
    let got = alone(Ask {
        sampling: greedy(),
        controls: Some(pb::LogitsControls {
            min_tokens: 4,
            min_tokens_stop_ids: vec![o[0], o[1]],
            ..Default::default()
        }),
        ..Ask::default()
    })?;
    report("min_tokens", expect(&got, o[2]));
    // A repetition penalty on the prompt's token (the only one it applies to before any output):
    // the expected winner follows from the formula.
    let penalty = 50.0f32;
    let mut penalised = reference.row.clone();
    let x = penalised[token as usize];
    penalised[token as usize] = if x > 0.0 { x / penalty } else { x * penalty };
    let winner = Reference::new(penalised).order[0];
    let got = alone(Ask {
        sampling: greedy(),
        controls: Some(pb::LogitsControls {
            repetition_penalty: penalty,
            ..Default::default()
        }),
        ..Ask::default()
    })?;
    report("repetition_penalty", expect(&got, winner));
    // A structured outputs mask: the better of the two allowed tokens, its raw log probability.
    let got = alone(Ask {
        sampling: greedy(),
        logprobs: Some(2),
        allowed: Some(mask(vocab, &[o[49], o[9]])),
        ..Ask::default()
    })?;
    report(
        "mask",
        expect(&got, o[9]).and_then(|_| reference.check(got.logprobs.as_ref(), o[9], 2)),
    );
    // The filters over a masked row (-inf entries): top-k 2 of the 5 allowed keeps the two best;
    // top-p and min-p keep tokens of the allowed set. Many seeds, one step.
    let allowed = mask(vocab, &o[..5]);
    let seeds: u64 = if fp8 { 8 } else { 16 };
    let sampled = |top_k: i32, top_p: f32, min_p: f32| {
        (0..seeds)
            .map(|seed| Ask {
                sampling: pb::SamplingParams {
                    temperature: 1.0,
                    top_k,
                    top_p,
                    min_p,
                    seed: Some(seed),
                },
                allowed: Some(allowed.clone()),
                ..Ask::default()
            })
            .collect::<Vec<_>>()
    };
    for (name, asks, keep) in [
        ("mask + top-k 2", sampled(2, 1.0, 0.0), 2),
        ("mask + top-p 0.99", sampled(0, 0.99, 0.0), 5),
        ("mask + min-p 0.01", sampled(0, 1.0, 0.01), 5),
    ] {
        let got = run_step(group, token, &asks, num_blocks)?;
        // The kept tokens, and any within one bf16 step (2^-7 relative) of the last of them: a
        // step of several rows may multiply the lm_head on another kernel than the one-row
        // reference, which moves logits by a rounding and can reorder near-ties.
        let last = reference.row[o[keep - 1] as usize];
        let near = last - last.abs() / 128.0;
        let outside: Vec<u32> = got
            .iter()
            .map(|t| t.token_id)
            .filter(|t| !o[..keep].contains(t) && reference.row[*t as usize] < near)
            .collect();
        report(
            name,
            if outside.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "drew {outside:?} (reference logits {:?}), outside {:?} (the last at {last})",
                    outside
                        .iter()
                        .map(|t| reference.row[*t as usize])
                        .collect::<Vec<_>>(),
                    &o[..keep]
                ))
            },
        );
    }
    if failures.is_empty() {
        println!("extras check: PASS (logprobs, logit_bias, bad_words, min_tokens, repetition_penalty, masks with every filter)");
        Ok(())
    } else {
        anyhow::bail!("extras check failed: {}", failures.join("; "))
    }
}
