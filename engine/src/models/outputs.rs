//! A forward pass's rows of logits turned into what each sequence wants: the whole row, its best
//! few entries, or only its most likely token. On a GPU the arg-max and the best entries are
//! found on the device, so a greedy sequence's step copies back 4 bytes and a top-k sampler's
//! k pairs rather than a row (151,936 floats for Qwen3: 32 streams copied 19 MB a step and
//! scanned it on the host).

use candle_core::{DType, Tensor, D};

use crate::batch::{Output, Wanted};
use crate::Result;

/// `logits` (`(rows, vocab)`, one row per entry of `wanted`, none `Nothing`) as each wants it.
pub(crate) fn outputs(logits: &Tensor, wanted: &[Wanted]) -> Result<Vec<Output>> {
    let logits = logits.to_dtype(DType::F32)?;
    if logits.device().is_cpu() {
        // Already in host memory: a scan there is as cheap as anything, and a top-k sampler's
        // scan runs with the other rows' in parallel when it reads the row itself.
        let rows = logits.to_vec2::<f32>()?;
        return Ok(rows
            .into_iter()
            .zip(wanted)
            .map(|(row, w)| match (w, crate::sampling::argmax(&row)) {
                (Wanted::Best, Some(best)) => Output::Best(best),
                // Nothing finite: the row goes to the sampler, which names the fault.
                _ => Output::Logits(row),
            })
            .collect());
    }
    on_device(&logits, wanted)
}

/// [`outputs`] for logits in device memory: arg-maxes and best entries found there, whole rows
/// copied in one go.
fn on_device(logits: &Tensor, wanted: &[Wanted]) -> Result<Vec<Output>> {
    let pick = |kind: fn(&Wanted) -> bool| -> Vec<u32> {
        (0..wanted.len() as u32)
            .filter(|&i| kind(&wanted[i as usize]))
            .collect()
    };
    let n = wanted.len();
    let k = (wanted.iter())
        .filter_map(|w| match w {
            Wanted::Top(k) => Some(*k as usize),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let best_rows = pick(|w| *w == Wanted::Best);
    let mut best = match rows_of(logits, best_rows.clone(), n)? {
        Some(t) => first_argmax(&t)?,
        None => Vec::new(),
    }
    .into_iter()
    .zip(best_rows)
    .map(|(found, row)| match found {
        Some(best) => Ok(Output::Best(best)),
        // Nothing finite (rare): the row goes to the sampler, which names the fault.
        None => Ok(Output::Logits(logits.get(row as usize)?.to_vec1::<f32>()?)),
    })
    .collect::<Result<Vec<_>>>()?
    .into_iter();
    let mut top = match rows_of(logits, pick(|w| matches!(w, Wanted::Top(_))), n)? {
        Some(t) => best_entries(&t, k)?,
        None => Vec::new(),
    }
    .into_iter();
    let mut full = match rows_of(logits, pick(|w| *w == Wanted::Logits), n)? {
        Some(t) => t.to_vec2::<f32>()?,
        None => Vec::new(),
    }
    .into_iter();
    wanted
        .iter()
        .map(|w| {
            let out = match w {
                Wanted::Best => best.next(),
                Wanted::Top(_) => top.next().map(Output::Top),
                _ => full.next().map(Output::Logits),
            };
            out.ok_or_else(|| crate::EngineError::Internal("a logits row went missing".into()))
        })
        .collect()
}

/// Each row's `k` best entries, best first, ties to the lower id: found on the GPU where its
/// kernel takes them, else from the rows copied to the host.
fn best_entries(logits: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    #[cfg(feature = "cuda")]
    if let Some(found) = crate::cuda::top_k::best_entries(logits, k)? {
        return Ok(found);
    }
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| crate::sampling::top_k(row, k))
        .collect())
}

/// The rows `rows` of `logits` (all `total` of them: no copy), or `None` for no rows.
fn rows_of(logits: &Tensor, rows: Vec<u32>, total: usize) -> Result<Option<Tensor>> {
    Ok(match rows.len() {
        0 => None,
        n if n == total => Some(logits.clone()),
        _ => Some(logits.index_select(&Tensor::new(rows, logits.device())?, 0)?),
    })
}

/// Each row's arg-max, the lowest index among equal maxima (as transformers' `argmax` and the
/// sampler pick: candle's CUDA arg-max does not promise which), computed where the tensor lives:
/// the row's maximum, where it is reached, and the first such place found as the largest
/// `vocab - index` there. Exact in f32 for vocabularies under 2^24. NaN counts as -inf (a NaN
/// maximum matched no place, and `vocab - 0` was an id past the vocabulary); `None` for a row
/// with nothing above -inf.
fn first_argmax(logits: &Tensor) -> Result<Vec<Option<u32>>> {
    let vocab = logits.dim(D::Minus1)?;
    let nan = logits.ne(logits)?;
    let floor = Tensor::full(f32::NEG_INFINITY, logits.shape(), logits.device())?;
    let logits = &nan.where_cond(&floor, logits)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let at_max = logits.broadcast_eq(&max)?.to_dtype(DType::F32)?;
    let from_end = Tensor::arange(0u32, vocab as u32, logits.device())?
        .to_dtype(DType::F32)?
        .affine(-1.0, vocab as f64)?;
    let first = at_max.broadcast_mul(&from_end)?.max(D::Minus1)?;
    let first = first.affine(-1.0, vocab as f64)?.to_dtype(DType::U32)?;
    let found = max.squeeze(D::Minus1)?.to_vec1::<f32>()?;
    Ok((first.to_vec1::<u32>()?.into_iter().zip(found))
        .map(|(at, max)| (max > f32::NEG_INFINITY).then_some(at))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_first_of_equal_maxima_wins_on_any_device_path() {
        let rows = [
            vec![0.5f32, 3.0, -1.0, 3.0, 2.0],
            vec![7.0, 7.0, 7.0, 7.0, 7.0],
            vec![-4.0, -3.0, -2.0, -1.0, -0.5],
            vec![f32::NEG_INFINITY, -1e30, f32::NEG_INFINITY, -1e30, -2e30],
            vec![f32::NAN, 1.0, 2.0, f32::NAN, 0.0],
            vec![f32::NAN; 5],
            vec![f32::NEG_INFINITY; 5],
        ];
        let t = Tensor::new(rows.to_vec(), &Device::Cpu).unwrap();
        let found = [Some(1), Some(0), Some(4), Some(1), Some(2), None, None];
        assert_eq!(first_argmax(&t).unwrap(), found);
        for row in &rows {
            let host = crate::sampling::argmax(row);
            let one = Tensor::new(row.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            assert_eq!(first_argmax(&one).unwrap(), [host], "{row:?}");
        }
    }

    /// A row with nothing finite reaches the sampler whole (which names the fault), on either
    /// path: the device's arg-max once gave id `vocab` for it, which the next step embedded.
    #[test]
    fn a_row_without_a_number_goes_to_the_sampler() {
        let t = Tensor::new(
            &[[f32::NAN, f32::NAN, f32::NAN], [f32::NAN, 1.0, 2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let want = [Wanted::Best, Wanted::Best];
        let nan = |o: &Output| matches!(o, Output::Logits(row) if row.iter().all(|l| l.is_nan()));
        for got in [outputs(&t, &want).unwrap(), on_device(&t, &want).unwrap()] {
            assert!(nan(&got[0]), "{got:?}");
            assert_eq!(got[1], Output::Best(2));
        }
    }

    #[test]
    fn each_row_comes_back_as_it_was_wanted() {
        let want = [Wanted::Best, Wanted::Logits, Wanted::Top(2), Wanted::Best];
        let t = Tensor::new(
            &[
                [1f32, 5.0, 2.0],
                [9.0, 0.0, 9.0],
                [0.0, 2.0, 2.0],
                [0.0, 2.0, 2.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        // The host's path: a top-k sampler reads its row itself, on the engine's threads.
        assert_eq!(
            outputs(&t, &want).unwrap(),
            [
                Output::Best(1),
                Output::Logits(vec![9.0, 0.0, 9.0]),
                Output::Logits(vec![0.0, 2.0, 2.0]),
                Output::Best(1),
            ]
        );
        // The device's path, run on the host's tensors.
        assert_eq!(
            on_device(&t, &want).unwrap(),
            [
                Output::Best(1),
                Output::Logits(vec![9.0, 0.0, 9.0]),
                Output::Top(vec![(1, 2.0), (2, 2.0)]),
                Output::Best(1),
            ]
        );
        let all_best = [Wanted::Best; 4];
        assert_eq!(
            on_device(&t, &all_best).unwrap(),
            [
                Output::Best(1),
                Output::Best(0),
                Output::Best(1),
                Output::Best(1)
            ]
        );
    }
}
