//! `--mixed-check`: the decode rows of a prompt step against the same rows decoded alone.
//!
//! On the GPU a prompt step runs its one-row tiles (decode rows) on the tensor-core decode
//! attention, in a launch of their own after the prompt tiles', when they fill the GPU on their
//! own (rows x KV heads >= 2 x SMs; `worker/src/cuda/mod.rs`), and a decode step of as many rows
//! runs the same kernel unsplit. The check prefills [`ROWS`] requests on distinct prompts twice
//! over (sets X and Y, in identical steps of 8 requests), decodes one token of set X alone and
//! one token of set Y beside a new prompt of [`NEW_PROMPT`] tokens, and requires each request's
//! greedy token and top log probabilities to agree within [`TOLERANCE`]: only the products'
//! row counts differ between the two steps. A decode row attending to another row's keys, or a
//! prompt tile's output landing on a decode row, changes them by far more. On the CPU (one kernel
//! for every row) the check holds trivially and only exercises the plans.

use tpserve_proto as pb;
use tpserve_worker::thread_group::ThreadGroup;

/// Requests of each set: 240 rows x 2 KV heads (the test checkpoint) fill 132 SMs twice over,
/// and both sets with the new prompt stay within the example's 512 sequences.
const ROWS: usize = 240;
/// Tokens of the prompt that makes set Y's step a prompt step (the prompt kernel takes
/// sequences of 16 rows or more).
const NEW_PROMPT: usize = 128;
/// Largest difference of a log probability between the two steps (bf16 products of different
/// row counts differ by rounding).
const TOLERANCE: f32 = 0.05;
/// Top log probabilities compared.
const TOP: u32 = 5;
/// Rows of the prefill steps (8 requests a step).
const PREFILL_BATCH: usize = 8;

const BLOCK_SIZE: usize = super::BLOCK_SIZE;

fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

/// Request `i`'s prompt: `base` rotated by `i`, its first token moved by `i / len` (distinct
/// prompts, every id below `vocab`).
fn prompt(base: &[u32], i: usize, vocab: usize) -> Vec<u32> {
    let len = base.len();
    let mut p: Vec<u32> = base[i % len..]
        .iter()
        .chain(&base[..i % len])
        .copied()
        .collect();
    p[0] = ((p[0] as usize + 7 * (i / len)) % vocab) as u32;
    p
}

/// Runs `plan` on every rank; rank 0's sampled tokens by request.
fn step(
    group: &ThreadGroup,
    plan: pb::StepPlan,
) -> anyhow::Result<std::collections::HashMap<u64, pb::SampledToken>> {
    let answers = group.on_all(move |_, r| r.step(&plan).map(|o| o.tokens))?;
    Ok(answers
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.sequence_id, t))
        .collect())
}

/// The check; prints PASS or fails naming the requests that differ.
pub fn mixed_check(
    group: &ThreadGroup,
    base: &[u32],
    new_prompt: &[u32],
    vocab: usize,
    num_blocks: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        new_prompt.len() >= NEW_PROMPT,
        "the mixed check needs a prompt of {NEW_PROMPT} tokens"
    );
    let len = base.len();
    let per_sequence = blocks_for(len + 1);
    anyhow::ensure!(
        2 * ROWS * per_sequence + blocks_for(NEW_PROMPT) <= num_blocks,
        "the cache is too small for the mixed check"
    );
    let greedy = pb::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        seed: None,
    };
    let blocks = |first: usize, count: usize| (first..first + count).map(|b| b as u32).collect();
    // Set s's request i: its id and its first block.
    let id = |s: usize, i: usize| 30_000 + 10_000 * s as u64 + i as u64;
    let first_block = |s: usize, i: usize| (s * ROWS + i) * per_sequence;
    let mut step_id = 100;
    let mut first_tokens = [Vec::new(), Vec::new()];
    for (s, firsts) in first_tokens.iter_mut().enumerate() {
        for chunk in (0..ROWS).collect::<Vec<_>>().chunks(PREFILL_BATCH) {
            step_id += 1;
            let out = step(
                group,
                pb::StepPlan {
                    step_id,
                    new_sequences: chunk
                        .iter()
                        .map(|&i| pb::NewSequence {
                            sequence_id: id(s, i),
                            token_ids: prompt(base, i, vocab),
                            sampling: Some(greedy),
                            block_ids: blocks(first_block(s, i), blocks_for(len)),
                            num_computed_tokens: 0,
                            num_scheduled_tokens: len as u32,
                            num_prompt_tokens: len as u32,
                            logprobs: Some(pb::LogprobsRequest {
                                sample: Some(TOP),
                                prompt: None,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            )?;
            for &i in chunk {
                let t = out
                    .get(&id(s, i))
                    .ok_or_else(|| anyhow::anyhow!("no first token for request {}", id(s, i)))?;
                firsts.push(t.token_id);
            }
        }
    }
    anyhow::ensure!(
        first_tokens[0] == first_tokens[1],
        "identical prefill steps sampled different first tokens"
    );
    // One decode row per request: the second token, with the block for it where needed.
    let decodes = |s: usize| -> Vec<pb::RunningSequence> {
        (0..ROWS)
            .map(|i| pb::RunningSequence {
                sequence_id: id(s, i),
                num_scheduled_tokens: 1,
                new_block_ids: blocks(
                    first_block(s, i) + blocks_for(len),
                    per_sequence - blocks_for(len),
                ),
            })
            .collect()
    };
    step_id += 1;
    let alone = step(
        group,
        pb::StepPlan {
            step_id,
            running: decodes(0),
            ..Default::default()
        },
    )?;
    step_id += 1;
    let new_id = 60_000;
    let mixed = step(
        group,
        pb::StepPlan {
            step_id,
            running: decodes(1),
            new_sequences: vec![pb::NewSequence {
                sequence_id: new_id,
                token_ids: new_prompt[..NEW_PROMPT].to_vec(),
                sampling: Some(greedy),
                block_ids: blocks(2 * ROWS * per_sequence, blocks_for(NEW_PROMPT)),
                num_computed_tokens: 0,
                num_scheduled_tokens: NEW_PROMPT as u32,
                num_prompt_tokens: NEW_PROMPT as u32,
                ..Default::default()
            }],
            ..Default::default()
        },
    )?;
    step_id += 1;
    let freed = (0..2)
        .flat_map(|s| (0..ROWS).map(move |i| id(s, i)))
        .chain([new_id])
        .collect();
    step(
        group,
        pb::StepPlan {
            step_id,
            freed_sequence_ids: freed,
            ..Default::default()
        },
    )?;

    let mut failures = Vec::new();
    let mut worst = 0.0f32;
    let mut same_tokens = 0;
    for i in 0..ROWS {
        let (a, b) = (alone.get(&id(0, i)), mixed.get(&id(1, i)));
        let (Some(a), Some(b)) = (a, b) else {
            failures.push(format!("request {i}: no token (alone {a:?}, mixed {b:?})"));
            continue;
        };
        let (Some(la), Some(lb)) = (&a.logprobs, &b.logprobs) else {
            failures.push(format!("request {i}: no log probabilities"));
            continue;
        };
        // Every top token of one step must be in the other's list at a logprob within the
        // tolerance, unless it is the last and a near-tie with the next (the lists may swap it).
        for (lx, ly) in [(la, lb), (lb, la)] {
            for (k, (&t, &x)) in lx.top_token_ids.iter().zip(&lx.top_logprobs).enumerate() {
                match ly.top_token_ids.iter().position(|&u| u == t) {
                    Some(j) => worst = worst.max((x - ly.top_logprobs[j]).abs()),
                    None if k + 1 == lx.top_token_ids.len()
                        && ly
                            .top_logprobs
                            .last()
                            .is_some_and(|&y| (x - y).abs() <= TOLERANCE) => {}
                    None => failures.push(format!("request {i}: top token {t} missing")),
                }
            }
        }
        if a.token_id == b.token_id {
            same_tokens += 1;
        } else {
            // A greedy difference is a near-tie of the two steps' top two, or a failure.
            let gap = la
                .top_logprobs
                .first()
                .zip(la.top_logprobs.get(1))
                .map(|(x, y)| x - y);
            if !gap.is_some_and(|g| g <= TOLERANCE) {
                failures.push(format!(
                    "request {i}: greedy token {} alone, {} beside a prompt",
                    a.token_id, b.token_id
                ));
            }
        }
    }
    if worst > TOLERANCE {
        failures.push(format!(
            "log probabilities differ by up to {worst:.4} (tolerance {TOLERANCE})"
        ));
    }
    if !mixed.contains_key(&new_id) {
        failures.push("the new prompt sampled no token".into());
    }
    anyhow::ensure!(
        failures.is_empty(),
        "mixed check: FAIL ({} problems): {}",
        failures.len(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "mixed check: PASS ({ROWS} decode rows alone and beside a {NEW_PROMPT}-token prompt: \
         {same_tokens}/{ROWS} greedy tokens equal, top-{TOP} logprobs within {worst:.4})"
    );
    Ok(())
}
