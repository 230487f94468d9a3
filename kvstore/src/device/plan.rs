//! Turning blocks and slots into the contiguous copies a device performs.

use super::DeviceError;
use crate::pages::LayerPages;

/// One block to copy: engine block `block` to or from the slot at address `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyJob {
    /// The engine's block id (its index in every layer's tensor).
    pub block: usize,
    /// Address of the slot in this process.
    pub slot: usize,
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Engine pages into slots (a save).
    Gather,
    /// Slots into engine pages (a load).
    Scatter,
}

/// One contiguous copy, as the copy kernel reads it (three little-endian u64s).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Source address as the device sees it.
    pub src: u64,
    /// Destination address as the device sees it.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// The copies for `jobs`: each block's page of each layer against its place in the slot (from
/// byte `slot_offset` of the block on). Pages that continue one another on both sides (a layout
/// where a block's layers are adjacent) become one copy; copies longer than `max_piece` are
/// split so that a batch spreads over the device. `slot_addr` maps a slot address to the one
/// the device uses (identity under unified addressing), failing for memory it cannot reach.
pub fn plan_pieces(
    layers: &[LayerPages],
    jobs: &[CopyJob],
    slot_offset: usize,
    direction: Direction,
    max_piece: usize,
    slot_addr: impl Fn(usize, usize) -> Result<u64, DeviceError>,
) -> Result<Vec<Piece>, DeviceError> {
    let max_piece = max_piece.max(1) as u64;
    let mut whole: Vec<Piece> = Vec::with_capacity(jobs.len() * layers.len());
    let block_len: usize = layers.iter().map(|l| l.page).sum();
    for job in jobs {
        let slot = job
            .slot
            .checked_add(slot_offset)
            .ok_or_else(|| DeviceError::BadCopy("slot address overflows".into()))?;
        let slot_dev = slot_addr(slot, block_len)?;
        let mut at = 0u64;
        for l in layers {
            let page = l
                .stride
                .checked_mul(job.block)
                .and_then(|o| l.base.checked_add(o))
                .ok_or_else(|| {
                    DeviceError::BadCopy(format!("block {} lies past the address space", job.block))
                })? as u64;
            let (src, dst) = match direction {
                Direction::Gather => (page, slot_dev + at),
                Direction::Scatter => (slot_dev + at, page),
            };
            at += l.page as u64;
            if l.page == 0 {
                continue;
            }
            match whole.last_mut() {
                Some(p) if p.src + p.len == src && p.dst + p.len == dst => p.len += l.page as u64,
                _ => whole.push(Piece {
                    src,
                    dst,
                    len: l.page as u64,
                }),
            }
        }
    }
    let mut out = Vec::with_capacity(whole.len());
    for p in whole {
        let mut done = 0;
        while done < p.len {
            let len = (p.len - done).min(max_piece);
            out.push(Piece {
                src: p.src + done,
                dst: p.dst + done,
                len,
            });
            done += len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(a: usize, _: usize) -> Result<u64, DeviceError> {
        Ok(a as u64)
    }

    #[test]
    fn gather_pieces_follow_the_block_layout() {
        // Two layers: pages of 64 and 32 bytes, strides 100 and 40.
        let layers = [
            LayerPages {
                base: 1000,
                stride: 100,
                page: 64,
            },
            LayerPages {
                base: 5000,
                stride: 40,
                page: 32,
            },
        ];
        let jobs = [
            CopyJob {
                block: 2,
                slot: 90_000,
            },
            CopyJob {
                block: 0,
                slot: 80_000,
            },
        ];
        let p = plan_pieces(&layers, &jobs, 0, Direction::Gather, 1 << 20, ident).unwrap();
        assert_eq!(
            p,
            vec![
                Piece {
                    src: 1200,
                    dst: 90_000,
                    len: 64
                },
                Piece {
                    src: 5080,
                    dst: 90_064,
                    len: 32
                },
                Piece {
                    src: 1000,
                    dst: 80_000,
                    len: 64
                },
                Piece {
                    src: 5000,
                    dst: 80_064,
                    len: 32
                },
            ]
        );
        let s = plan_pieces(&layers, &jobs[..1], 0, Direction::Scatter, 1 << 20, ident).unwrap();
        assert_eq!(
            s[1],
            Piece {
                src: 90_064,
                dst: 5080,
                len: 32
            }
        );
    }

    #[test]
    fn adjacent_pages_merge_and_long_ones_split() {
        // A cross-layer layout: block b's layer l at 4096*(2b + l), pages of 4096.
        let layers = [
            LayerPages {
                base: 0,
                stride: 8192,
                page: 4096,
            },
            LayerPages {
                base: 4096,
                stride: 8192,
                page: 4096,
            },
        ];
        let jobs = [CopyJob {
            block: 3,
            slot: 1 << 20,
        }];
        let p = plan_pieces(&layers, &jobs, 0, Direction::Gather, 1 << 20, ident).unwrap();
        assert_eq!(
            p,
            vec![Piece {
                src: 24576,
                dst: 1 << 20,
                len: 8192
            }]
        );
        let split = plan_pieces(&layers, &jobs, 0, Direction::Gather, 3000, ident).unwrap();
        assert_eq!(
            split.iter().map(|p| p.len).collect::<Vec<_>>(),
            vec![3000, 3000, 2192]
        );
        assert_eq!(
            split[2],
            Piece {
                src: 24576 + 6000,
                dst: (1 << 20) + 6000,
                len: 2192
            }
        );
        // Consecutive slots of consecutive blocks merge across jobs as well.
        let two = [
            CopyJob {
                block: 3,
                slot: 1 << 20,
            },
            CopyJob {
                block: 4,
                slot: (1 << 20) + 8192,
            },
        ];
        let p = plan_pieces(&layers, &two, 0, Direction::Gather, 1 << 20, ident).unwrap();
        assert_eq!(
            p,
            vec![Piece {
                src: 24576,
                dst: 1 << 20,
                len: 16384
            }]
        );
    }

    #[test]
    fn offsets_and_translation_apply_to_the_slot_side() {
        let layers = [LayerPages {
            base: 0,
            stride: 16,
            page: 16,
        }];
        let jobs = [CopyJob { block: 1, slot: 500 }];
        let p = plan_pieces(&layers, &jobs, 32, Direction::Gather, 64, |a, _| Ok(a as u64 + 7)).unwrap();
        assert_eq!(
            p,
            vec![Piece {
                src: 16,
                dst: 539,
                len: 16
            }]
        );
        let err = plan_pieces(&layers, &jobs, 0, Direction::Gather, 64, |_, _| {
            Err(DeviceError::BadCopy("not registered".into()))
        });
        assert!(err.is_err());
        let huge = [CopyJob {
            block: usize::MAX,
            slot: 0,
        }];
        assert!(plan_pieces(&layers, &huge, 0, Direction::Gather, 64, ident).is_err());
    }
}
