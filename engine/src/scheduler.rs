//! The scheduler's decision, a pure function of the engine's state: which sequences run in the
//! next forward pass and how many of their tokens, which waiting requests join, and which running
//! sequences give their blocks back when the pool runs short.
//!
//! Policy (first come, first served, as vLLM's): running sequences keep their places in the
//! order they joined (one preempted and joining again comes last); each gets its next token (decode) or the next chunk of its prompt, within a per-step
//! token budget, so a long prompt is prefilled in chunks between other sequences' decode steps.
//! When a running sequence needs a block and none is left, the running sequence that joined
//! last is preempted (its blocks freed; it is recomputed from its tokens later, so its output does not
//! change). Waiting requests join in arrival order while budget, sequence slots and blocks last,
//! and none joins in a step that had to preempt. A sequence whose reader has fallen behind is
//! paused: it keeps its place and blocks but computes nothing, so a client that stops reading
//! stops its generation instead of filling a buffer; when blocks run out, paused sequences are
//! preempted first, and a waiting request that finds every slot or block held by paused ones is
//! made room for by preempting them, so stalled clients never starve those that read. A waiting request whose
//! prompt continues past its cached prefix into a block a running sequence (or one ahead of it
//! in the queue) is about to compute (`n` choices of one prompt, clients sharing a system
//! prompt, arriving together) waits for it to land in the prefix cache rather than compute it a
//! second time; it keeps its place (a slot and blocks set aside), and the requests behind it
//! join in what is left.

/// A running sequence, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Its id.
    pub id: u64,
    /// Tokens it has (prompt plus generated).
    pub tokens: usize,
    /// Tokens whose cache entries are in the pool.
    pub computed: usize,
    /// Blocks it holds.
    pub blocks: usize,
    /// Of those, the blocks no other sequence holds: what preempting it frees (a prefix-cache
    /// block it shares stays held by the others).
    pub own_blocks: usize,
    /// Its reader has fallen behind (a client that stopped reading): it computes nothing until
    /// the reader catches up, keeping its place and its blocks.
    pub paused: bool,
}

/// A waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// Its id.
    pub id: u64,
    /// Tokens it has (prompt, plus what it generated before a preemption).
    pub tokens: usize,
    /// Leading tokens the prefix cache already holds (a multiple of the block size, less than
    /// `tokens`).
    pub cached: usize,
    /// Of the cached prefix's blocks, those running sequences hold: sharing them takes no free
    /// block (the others are idle in the cache and count as free until taken).
    pub cached_held: usize,
    /// Of those held, the blocks a paused sequence alone holds: preempting it frees them among
    /// its own blocks, and they are held no longer (counted once, not twice, in what it frees).
    pub cached_own_paused: usize,
    /// Its reader has fallen behind (a paused sequence preempted): it is not admitted until
    /// the reader catches up, so that it does not take blocks only to yield them again.
    pub paused: bool,
    /// The next block of its prompt past `cached` is about to be computed by a running sequence
    /// or one ahead of it in the queue: it is not admitted until that block is in the prefix
    /// cache, but keeps its place.
    pub prefix_pending: bool,
}

/// The engine's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Token positions per block.
    pub block_size: usize,
    /// New tokens per forward pass over all sequences.
    pub token_budget: usize,
    /// Sequences running at once.
    pub max_seqs: usize,
}

/// The state the decision is made from.
#[derive(Debug, Clone, Copy)]
pub struct State<'a> {
    /// Running sequences, in the order they joined (the first joined first).
    pub running: &'a [Running],
    /// Waiting requests, oldest first.
    pub waiting: &'a [Waiting],
    /// Blocks that can be allocated now.
    pub free_blocks: usize,
    /// The limits.
    pub limits: Limits,
}

/// One sequence's share of the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// The sequence.
    pub id: u64,
    /// New tokens it computes.
    pub tokens: usize,
    /// Blocks it must be given first.
    pub new_blocks: usize,
}

/// The next step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running sequences to preempt first (their blocks freed, back to waiting).
    pub preempt: Vec<u64>,
    /// Waiting requests that join (they appear in `work` too).
    pub admit: Vec<u64>,
    /// What runs, running sequences first (in the order they joined), then those admitted.
    pub work: Vec<Work>,
}

impl Plan {
    /// Whether the step does nothing.
    pub fn is_idle(&self) -> bool {
        self.work.is_empty()
    }
}

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// The next step's plan.
pub fn schedule(state: &State<'_>) -> Plan {
    let Limits {
        block_size: bs,
        token_budget,
        ..
    } = state.limits;
    let mut plan = Plan::default();
    let mut budget = token_budget;
    let mut free = state.free_blocks;
    let mut kept: Vec<Running> = state.running.to_vec();
    let mut i = 0;
    while i < kept.len() {
        let s = kept[i];
        let want = if s.paused {
            0
        } else {
            (s.tokens - s.computed).min(budget)
        };
        if want == 0 {
            i += 1;
            continue;
        }
        let need = |n: usize| blocks_for(s.computed + n, bs).saturating_sub(s.blocks);
        // Preempt until this one's next token fits: paused sequences first, whatever their age
        // (their clients stopped reading; holding their blocks would starve those that read),
        // then newer ones.
        while need(1) > free {
            let victim = match kept.iter().rposition(|k| k.paused) {
                Some(j) => {
                    if j < i {
                        i -= 1;
                    }
                    Some(kept.remove(j))
                }
                None if kept.len() > i + 1 => kept.pop(),
                None => None,
            };
            let Some(victim) = victim else { break };
            free += victim.own_blocks;
            plan.preempt.push(victim.id);
        }
        if need(1) > free {
            // The newest sequence itself cannot grow: it waits for blocks to come back.
            kept.remove(i);
            free += s.own_blocks;
            plan.preempt.push(s.id);
            continue;
        }
        // A prompt chunk shrinks to what the free blocks hold rather than preempt for it.
        let fits = (s.blocks + free) * bs - s.computed;
        let tokens = want.min(fits);
        let new_blocks = need(tokens);
        free -= new_blocks;
        budget -= tokens;
        plan.work.push(Work {
            id: s.id,
            tokens,
            new_blocks,
        });
        i += 1;
    }
    if !plan.preempt.is_empty() || yield_paused(state, &mut kept, free, &mut plan) {
        return plan;
    }
    admit(state, kept.len(), (free, budget), &mut plan);
    plan
}

/// Preempts paused sequences, newest first, when the first waiting request that reads cannot
/// join for want of a sequence slot or of a block for its first chunk, and the paused ones'
/// slots and blocks would let it: stalled readers never keep out one that reads. Whether it
/// preempted (then nothing joins this step; the request does in the next).
fn yield_paused(state: &State<'_>, kept: &mut Vec<Running>, free: usize, plan: &mut Plan) -> bool {
    let Some(w) = state.waiting.iter().find(|w| !w.paused) else {
        return false;
    };
    let bs = state.limits.block_size;
    let blocked = |seqs: usize, free: usize, held: usize| {
        seqs >= state.limits.max_seqs || (free + held) * bs <= w.cached
    };
    // Once paused sequences go, the cached blocks they alone held are free, not held: counted
    // as held too, a request that would not fit even then was preempted for.
    let held_after = w.cached_held.saturating_sub(w.cached_own_paused);
    let paused = kept.iter().filter(|k| k.paused);
    let (count, blocks) = paused.fold((0, 0), |(n, b), k| (n + 1, b + k.own_blocks));
    if !blocked(kept.len(), free, w.cached_held)
        || blocked(kept.len() - count, free + blocks, held_after)
    {
        return false;
    }
    let mut free = free;
    while blocked(kept.len(), free, held_after) {
        let Some(j) = kept.iter().rposition(|k| k.paused) else {
            break;
        };
        let victim = kept.remove(j);
        free += victim.own_blocks;
        plan.preempt.push(victim.id);
    }
    true
}

/// Admits waiting sequences in queue order beside the `running` ones kept, while a sequence
/// slot, the token budget and the free blocks last (`room`: free blocks, budget). One held for
/// a prefix being computed keeps its place: its slot and blocks are set aside, and those
/// behind it join only in what is left.
fn admit(state: &State<'_>, running: usize, room: (usize, usize), plan: &mut Plan) {
    let (mut free, mut budget) = room;
    let bs = state.limits.block_size;
    let unpaused = state.waiting.iter().filter(|w| !w.paused);
    for (seqs, w) in (running..).zip(unpaused) {
        if seqs >= state.limits.max_seqs || budget == 0 {
            break;
        }
        // Cached blocks that running sequences hold cost nothing; idle cached ones are counted
        // (they are part of `free` until taken). The first chunk shrinks to the free blocks; the
        // queue is never jumped.
        let fits = ((free + w.cached_held) * bs).saturating_sub(w.cached);
        let tokens = (w.tokens - w.cached).min(budget).min(fits);
        if tokens == 0 {
            break;
        }
        let cost = blocks_for(w.cached + tokens, bs) - w.cached_held;
        free -= cost;
        if w.prefix_pending {
            continue;
        }
        budget -= tokens;
        plan.admit.push(w.id);
        plan.work.push(Work {
            id: w.id,
            tokens,
            new_blocks: blocks_for(w.cached + tokens, bs) - w.cached / bs,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        block_size: 4,
        token_budget: 16,
        max_seqs: 8,
    };

    fn run(id: u64, tokens: usize, computed: usize) -> Running {
        Running {
            id,
            tokens,
            computed,
            blocks: computed.div_ceil(4),
            own_blocks: computed.div_ceil(4),
            paused: false,
        }
    }

    fn wait(id: u64, tokens: usize) -> Waiting {
        Waiting {
            id,
            tokens,
            cached: 0,
            cached_held: 0,
            cached_own_paused: 0,
            paused: false,
            prefix_pending: false,
        }
    }

    fn plan(running: &[Running], waiting: &[Waiting], free: usize, limits: Limits) -> Plan {
        schedule(&State {
            running,
            waiting,
            free_blocks: free,
            limits,
        })
    }

    #[test]
    fn decodes_run_first_and_a_long_prompt_is_chunked_by_the_budget() {
        // Two sequences decoding, one 40-token prompt waiting: it gets what the budget leaves.
        let p = plan(&[run(1, 9, 8), run(2, 5, 4)], &[wait(3, 40)], 100, LIMITS);
        assert_eq!(p.preempt, Vec::<u64>::new());
        assert_eq!(p.admit, vec![3]);
        let tokens: Vec<_> = p.work.iter().map(|w| (w.id, w.tokens)).collect();
        assert_eq!(tokens, vec![(1, 1), (2, 1), (3, 14)]);
        // Sequence 1 at 8 tokens needs a third block for its ninth; 2 has room in its second.
        assert_eq!(p.work[0].new_blocks, 1);
        assert_eq!(p.work[1].new_blocks, 1);
        assert_eq!(p.work[2].new_blocks, 4);
        // Next step: the prompt continues with the next chunk, the decodes keep going.
        let p = plan(
            &[run(1, 10, 9), run(2, 6, 5), run(3, 40, 14)],
            &[],
            100,
            LIMITS,
        );
        let tokens: Vec<_> = p.work.iter().map(|w| (w.id, w.tokens)).collect();
        assert_eq!(tokens, vec![(1, 1), (2, 1), (3, 14)]);
    }

    #[test]
    fn the_newest_sequence_is_preempted_when_blocks_run_out() {
        // Both at a block boundary, one free block: the older one grows, the newer one yields.
        let p = plan(&[run(1, 9, 8), run(2, 9, 8)], &[wait(3, 2)], 1, LIMITS);
        assert_eq!(p.preempt, vec![2]);
        assert_eq!(
            p.work,
            vec![Work {
                id: 1,
                tokens: 1,
                new_blocks: 1
            }]
        );
        assert!(p.admit.is_empty(), "nothing joins in a step that preempted");
        // No block at all: the only sequence waits rather than fail.
        let p = plan(&[run(1, 9, 8)], &[], 0, LIMITS);
        assert_eq!(p.preempt, vec![1]);
        assert!(p.is_idle());
    }

    #[test]
    fn admission_is_first_come_first_served_within_every_limit() {
        // Not enough blocks for the first waiting request: the second does not jump the queue.
        let p = plan(&[], &[wait(1, 20), wait(2, 2)], 3, LIMITS);
        assert_eq!(
            p.admit,
            vec![1],
            "the second request does not jump the queue"
        );
        assert_eq!(
            p.work[0].tokens, 12,
            "the first chunk shrinks to the 3 free blocks"
        );
        let p = plan(&[], &[wait(1, 20), wait(2, 2)], 0, LIMITS);
        assert!(p.is_idle());
    }

    #[test]
    fn sequence_slots_and_the_token_budget_bound_admission() {
        let limits = Limits {
            max_seqs: 2,
            ..LIMITS
        };
        let p = plan(&[run(1, 5, 4)], &[wait(2, 3), wait(3, 3)], 100, limits);
        assert_eq!(p.admit, vec![2]);
        let tight = Limits {
            token_budget: 1,
            ..LIMITS
        };
        let p = plan(&[run(1, 5, 4)], &[wait(2, 3)], 100, tight);
        assert!(p.admit.is_empty(), "the decode used the whole budget");
    }

    #[test]
    fn preempting_a_sequence_frees_only_the_blocks_it_holds_alone() {
        // Sequence 1 prefills; 2 and 3 share a 4-block prefix and hold one block each besides.
        let shared = |id| Running {
            id,
            tokens: 18,
            computed: 17,
            blocks: 5,
            own_blocks: 1,
            paused: false,
        };
        let p = plan(&[run(1, 40, 8), shared(2), shared(3)], &[], 0, LIMITS);
        assert_eq!(p.preempt, vec![3], "the newest yields");
        // Only its own block came back: the chunk is one block, not the five it held.
        assert_eq!(
            p.work[0],
            Work {
                id: 1,
                tokens: 4,
                new_blocks: 1
            }
        );
        // 2 decodes inside its last block (17 of 20 positions used): no block needed.
        assert_eq!(
            p.work[1],
            Work {
                id: 2,
                tokens: 1,
                new_blocks: 0
            }
        );
    }

    #[test]
    fn sharing_held_cached_blocks_costs_no_free_block() {
        // A 40-token prompt whose first 32 tokens (8 blocks) other running sequences hold: with
        // 2 free blocks it still joins.
        let w = Waiting {
            cached: 32,
            cached_held: 8,
            ..wait(9, 40)
        };
        let p = plan(&[], &[w], 2, LIMITS);
        assert_eq!(p.admit, vec![9]);
        assert_eq!(
            p.work,
            vec![Work {
                id: 9,
                tokens: 8,
                new_blocks: 2
            }]
        );
        // Idle cached blocks do count: the same prompt with nothing held cannot join.
        let idle = Waiting {
            cached_held: 0,
            ..w
        };
        assert!(plan(&[], &[idle], 2, LIMITS).admit.is_empty());
    }

    #[test]
    fn a_cached_prefix_is_not_recomputed() {
        let w = Waiting {
            cached: 8,
            ..wait(1, 10)
        };
        let p = plan(&[], &[w], 100, LIMITS);
        assert_eq!(
            p.work,
            vec![Work {
                id: 1,
                tokens: 2,
                new_blocks: 1
            }]
        );
    }

    #[test]
    fn a_prompt_chunk_shrinks_to_the_free_blocks() {
        // 30 tokens to go, 2 free blocks plus room in its own: it takes what fits.
        let p = plan(&[run(1, 40, 10)], &[], 2, LIMITS);
        assert_eq!(
            p.work,
            vec![Work {
                id: 1,
                tokens: 10,
                new_blocks: 2
            }]
        );
    }

    #[test]
    fn a_paused_sequence_computes_nothing_and_keeps_its_place_and_blocks() {
        let paused = Running {
            paused: true,
            ..run(1, 9, 8)
        };
        let p = plan(&[paused, run(2, 9, 8)], &[wait(3, 4)], 10, LIMITS);
        assert!(p.preempt.is_empty());
        assert_eq!(
            p.work.iter().map(|w| w.id).collect::<Vec<_>>(),
            vec![2, 3],
            "the paused sequence is skipped, the others run: {p:?}"
        );
        let alone = plan(&[paused], &[], 10, LIMITS);
        assert!(alone.is_idle(), "{alone:?}");
    }

    /// When blocks run out, a paused sequence (its client stopped reading) yields before any
    /// that runs, older than they or not.
    #[test]
    fn a_paused_sequence_yields_its_blocks_first() {
        let paused = Running {
            paused: true,
            ..run(1, 9, 8)
        };
        let p = plan(&[paused, run(2, 9, 8), run(3, 9, 8)], &[], 1, LIMITS);
        assert_eq!(p.preempt, vec![1], "{p:?}");
        assert_eq!(
            p.work.iter().map(|w| w.id).collect::<Vec<_>>(),
            vec![2, 3],
            "{p:?}"
        );
        // Back in the queue, still unread: newer requests join, it does not.
        let stalled = Waiting {
            paused: true,
            ..wait(1, 9)
        };
        let p = plan(&[], &[stalled, wait(4, 4)], 10, LIMITS);
        assert_eq!(p.admit, vec![4], "{p:?}");
    }

    /// Paused sequences that hold every free block, or every sequence slot, give them up to a
    /// request that reads, newest first and only as many as it takes; not for a request that
    /// would not fit even then, nor for one whose own reader stalled.
    #[test]
    fn paused_sequences_make_room_for_a_request_that_reads() {
        // 29 of 30 tokens computed: 8 blocks each, all 16 of the pool.
        let paused = |id| Running {
            paused: true,
            ..run(id, 30, 29)
        };
        let p = plan(&[paused(1), paused(2)], &[wait(3, 5)], 0, LIMITS);
        assert_eq!(p.preempt, vec![2], "{p:?}");
        assert!(p.admit.is_empty() && p.work.is_empty(), "{p:?}");
        let p = plan(&[paused(1)], &[wait(3, 5)], 8, LIMITS);
        assert_eq!((p.preempt.len(), p.admit.clone()), (0, vec![3]), "{p:?}");
        // Every slot taken by a paused sequence, the pool nearly empty.
        let two = Limits {
            max_seqs: 2,
            ..LIMITS
        };
        let p = plan(&[paused(1), paused(2)], &[wait(3, 5)], 100, two);
        assert_eq!(p.preempt, vec![2], "{p:?}");
        // Room already: nobody is preempted.
        let p = plan(&[paused(1), paused(2)], &[wait(3, 5)], 4, LIMITS);
        assert_eq!((p.preempt.len(), p.admit.clone()), (0, vec![3]), "{p:?}");
        // A request whose reader stalled too, and one that would not fit even then.
        let stalled = Waiting {
            paused: true,
            ..wait(3, 5)
        };
        let p = plan(&[paused(1), paused(2)], &[stalled], 0, LIMITS);
        assert!(p.preempt.is_empty(), "{p:?}");
        let mostly_cached = Waiting {
            cached: 80,
            cached_held: 0,
            ..wait(3, 90)
        };
        let p = plan(&[paused(1), paused(2)], &[mostly_cached], 0, LIMITS);
        assert!(p.preempt.is_empty(), "{p:?}");
        // Its cached prefix held by a paused sequence alone: preempting that one frees those
        // blocks once, which leaves no room for the rest, so nobody is preempted for it.
        let held_by_paused = Waiting {
            cached: 32,
            cached_held: 8,
            cached_own_paused: 8,
            ..wait(3, 33)
        };
        let p = plan(&[paused(1)], &[held_by_paused], 0, LIMITS);
        assert!(p.preempt.is_empty(), "{p:?}");
        // A block to spare: it joins beside it, sharing the held prefix.
        let p = plan(&[paused(1)], &[held_by_paused], 1, LIMITS);
        assert_eq!((p.preempt.len(), p.admit.clone()), (0, vec![3]), "{p:?}");
    }

    #[test]
    fn a_prompt_whose_prefix_is_being_computed_waits_for_the_cache() {
        let pending = Waiting {
            prefix_pending: true,
            ..wait(2, 40)
        };
        let p = plan(&[run(1, 40, 32)], &[pending, wait(3, 4)], 100, LIMITS);
        assert_eq!(p.admit, vec![3], "the ones behind it join: {p:?}");
        let ids: Vec<u64> = p.work.iter().map(|w| w.id).collect();
        assert_eq!(ids, [1, 3], "{p:?}");
        // It keeps its place: a slot and its blocks are set aside for it.
        let two = Limits {
            max_seqs: 2,
            ..LIMITS
        };
        let p = plan(&[run(1, 40, 32)], &[pending, wait(3, 4)], 100, two);
        assert!(p.admit.is_empty(), "no slot behind it: {p:?}");
        let p = plan(&[run(1, 40, 32)], &[pending, wait(3, 4)], 4, LIMITS);
        assert!(p.admit.is_empty(), "its blocks are kept for it: {p:?}");
    }
}
