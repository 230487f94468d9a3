//! Planning the RDMA READs of one pull, and following their completions, in plain Rust so that
//! every rule is tested without a device.
//!
//! A plan turns the blocks of a pull into work requests (WRs): each WR reads one contiguous
//! range of the source's arena and scatters it into one or more local ranges (SGEs). Blocks
//! that lie back to back in the source's arena share a WR, and blocks larger than the port's
//! largest message are split over several. WRs are grouped into chains; a chain is posted with
//! one `ibv_post_send` and only its last WR asks for a completion: a reliable connection
//! completes a send queue in order, so that one completion says the whole chain has landed.

/// The work completion status of success (`IBV_WC_SUCCESS`).
pub(crate) const WC_SUCCESS: u32 = 0;

/// One block to read: where it sits in the source's registered memory, where it goes in local
/// registered memory, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadItem {
    /// Address in the source's memory region.
    pub(crate) remote: u64,
    /// Address in the local memory region.
    pub(crate) local: u64,
    /// Bytes.
    pub(crate) len: u64,
}

/// What a plan must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadLimits {
    /// Largest message one WR may carry (the port's `max_msg_sz`).
    pub(crate) max_msg: u64,
    /// Most local SGEs one READ may scatter into (the QP's `max_send_sge`).
    pub(crate) max_sge: usize,
    /// Most WRs in one chain.
    pub(crate) max_chain: usize,
}

impl ReadLimits {
    /// The limits with every bound at least 1, and a message no longer than an SGE can describe
    /// (`ibv_sge::length` is 32 bits).
    fn effective(self) -> Self {
        Self {
            max_msg: self.max_msg.clamp(1, u64::from(u32::MAX)),
            max_sge: self.max_sge.max(1),
            max_chain: self.max_chain.max(1),
        }
    }
}

/// One local range a READ scatters into (the lkey is added when posting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sge {
    /// Local address.
    pub(crate) addr: u64,
    /// Bytes; never 0.
    pub(crate) len: u32,
}

/// One RDMA READ work request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadWr {
    /// Its id, as [`wr_id`] encodes it.
    pub(crate) wr_id: u64,
    /// Where the read starts in the source's region.
    pub(crate) remote: u64,
    /// Where the bytes go, in order.
    pub(crate) sges: Vec<Sge>,
    /// Whether it asks for a completion (the last WR of its chain).
    pub(crate) signaled: bool,
}

#[cfg(test)]
impl ReadWr {
    /// Bytes read.
    pub(crate) fn len(&self) -> u64 {
        self.sges.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// WRs posted together, with the items they carry (parts of them, for a split item).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    /// The WRs, in posting order; only the last is signalled.
    pub(crate) wrs: Vec<ReadWr>,
    /// Indices of the items any of the WRs carries, ascending.
    pub(crate) items: Vec<u32>,
}

/// The READs of one pull.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReadPlan {
    /// Chains in posting order; chain `i` has id `i`.
    pub(crate) chains: Vec<Chain>,
    /// How many items the plan was made for.
    pub(crate) items: usize,
}

/// Why no plan was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    /// An item's range wraps around the address space.
    #[error("block {item}: its range overflows 64-bit addresses")]
    Overflow {
        /// The item.
        item: usize,
    },
    /// More items or chains than a work request id can number.
    #[error("too many reads for one pull")]
    TooLarge,
}

/// The id of WR `pos` of chain `chain`: the chain in the high 32 bits, the position in the low.
/// Completions carry it back, including the error completions of unsignalled WRs.
pub(crate) fn wr_id(chain: u32, pos: u32) -> u64 {
    (u64::from(chain) << 32) | u64::from(pos)
}

/// The chain and position encoded by [`wr_id`].
pub(crate) fn split_wr_id(id: u64) -> (u32, u32) {
    ((id >> 32) as u32, id as u32)
}

/// A WR being assembled.
#[derive(Debug)]
struct Building {
    remote: u64,
    len: u64,
    sges: Vec<Sge>,
    /// SGE lengths before narrowing to 32 bits (a message is at most `u32::MAX` bytes, so they
    /// always fit).
    sge_lens: Vec<u64>,
    items: Vec<u32>,
}

impl Building {
    fn new(remote: u64) -> Self {
        Self {
            remote,
            len: 0,
            sges: Vec::new(),
            sge_lens: Vec::new(),
            items: Vec::new(),
        }
    }

    /// Whether the last SGE ends exactly at `local`, so a piece there extends it.
    fn extends_last(&self, local: u64) -> bool {
        self.sges
            .last()
            .zip(self.sge_lens.last())
            .is_some_and(|(s, &len)| s.addr + len == local)
    }

    /// Whether a piece of an item at `remote`/`local` can go on in this WR.
    fn can_take(&self, remote: u64, local: u64, lim: &ReadLimits) -> bool {
        self.remote + self.len == remote
            && self.len < lim.max_msg
            && (self.extends_last(local) || self.sges.len() < lim.max_sge)
    }

    /// Adds up to `len` bytes of item `item`; returns how many it took.
    fn take(&mut self, item: u32, local: u64, len: u64, lim: &ReadLimits) -> u64 {
        let piece = len.min(lim.max_msg - self.len);
        if self.extends_last(local) {
            if let Some(last) = self.sge_lens.last_mut() {
                *last += piece;
            }
        } else {
            self.sges.push(Sge { addr: local, len: 0 });
            self.sge_lens.push(piece);
        }
        self.len += piece;
        if self.items.last() != Some(&item) {
            self.items.push(item);
        }
        piece
    }

    fn finish(mut self, chain: u32, pos: u32) -> (ReadWr, Vec<u32>) {
        for (s, &len) in self.sges.iter_mut().zip(&self.sge_lens) {
            // At most `max_msg`, which `effective` bounds by `u32::MAX`.
            s.len = u32::try_from(len).unwrap_or(u32::MAX);
        }
        let wr = ReadWr {
            wr_id: wr_id(chain, pos),
            remote: self.remote,
            sges: self.sges,
            signaled: false,
        };
        (wr, self.items)
    }
}

/// Plans the READs of `items` within `limits`: every byte of every item is read exactly once,
/// into the same offset of its local range; items are taken in order; zero-length items need no
/// READ and appear in no chain.
pub(crate) fn plan_reads(items: &[ReadItem], limits: ReadLimits) -> Result<ReadPlan, PlanError> {
    let lim = limits.effective();
    if u32::try_from(items.len()).is_err() {
        return Err(PlanError::TooLarge);
    }
    let mut plan = ReadPlan {
        chains: Vec::new(),
        items: items.len(),
    };
    let mut chain = Chain::default();
    let mut wr: Option<Building> = None;

    // Closes the WR under construction into the current chain, and the chain into the plan once
    // it is full.
    fn close_wr(
        plan: &mut ReadPlan,
        chain: &mut Chain,
        wr: Building,
        lim: &ReadLimits,
    ) -> Result<(), PlanError> {
        let id = u32::try_from(plan.chains.len()).map_err(|_| PlanError::TooLarge)?;
        let pos = u32::try_from(chain.wrs.len()).map_err(|_| PlanError::TooLarge)?;
        let (wr, items) = wr.finish(id, pos);
        chain.wrs.push(wr);
        for i in items {
            if chain.items.last() != Some(&i) {
                chain.items.push(i);
            }
        }
        if chain.wrs.len() >= lim.max_chain {
            close_chain(plan, chain);
        }
        Ok(())
    }
    fn close_chain(plan: &mut ReadPlan, chain: &mut Chain) {
        if let Some(last) = chain.wrs.last_mut() {
            last.signaled = true;
            plan.chains.push(std::mem::take(chain));
        }
    }

    for (index, item) in items.iter().enumerate() {
        let (Some(_), Some(_)) = (
            item.remote.checked_add(item.len),
            item.local.checked_add(item.len),
        ) else {
            return Err(PlanError::Overflow { item: index });
        };
        let index = index as u32;
        let mut done = 0;
        while done < item.len {
            let (remote, local) = (item.remote + done, item.local + done);
            if !wr.as_ref().is_some_and(|w| w.can_take(remote, local, &lim)) {
                if let Some(full) = wr.take() {
                    close_wr(&mut plan, &mut chain, full, &lim)?;
                }
                wr = Some(Building::new(remote));
            }
            if let Some(w) = wr.as_mut() {
                done += w.take(index, local, item.len - done, &lim);
            }
        }
    }
    if let Some(last) = wr.take() {
        close_wr(&mut plan, &mut chain, last, &lim)?;
    }
    close_chain(&mut plan, &mut chain);
    Ok(plan)
}

/// Where a chain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainState {
    /// Not posted yet.
    Waiting,
    /// Posted; its last completion has not come.
    Posted,
    /// Its signalled WR completed successfully: every byte of it has landed.
    Done,
    /// A WR of it completed in error (`settled`: its last WR's completion came too, so none of
    /// it is still in flight).
    Failed {
        /// The first error status seen.
        status: u32,
        /// Whether nothing of the chain is in flight any more.
        settled: bool,
    },
}

/// What became of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemOutcome {
    /// Every byte of it has landed.
    Done,
    /// A READ carrying part of it completed with this error status.
    Failed {
        /// The work completion status (`ibv_wc_status`).
        status: u32,
    },
    /// Some of it was never read, or had not completed when the pull gave up.
    Unfinished,
}

/// A completion that does not belong to the plan; the device or the bookkeeping is broken and
/// the pull must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TrackError {
    /// The id names no WR of the plan.
    #[error("completion for unknown work request {0:#x}")]
    Unknown(u64),
    /// The id names a WR that was never posted.
    #[error("completion for work request {0:#x}, which was not posted")]
    NotPosted(u64),
    /// The id names a WR of a chain that had already completed.
    #[error("second completion for work request {0:#x}")]
    Duplicate(u64),
}

/// Follows a plan's chains from posting to completion and tells which items arrived.
#[derive(Debug)]
pub(crate) struct ReadTracker {
    chains: Vec<(ChainState, u32, Vec<u32>)>,
    /// Per item: chains carrying part of it that have not completed successfully.
    waiting: Vec<u32>,
    /// Per item: the first error status of a chain carrying part of it.
    failed: Vec<Option<u32>>,
    next: usize,
    in_flight: usize,
    any_failed: bool,
}

impl ReadTracker {
    /// A tracker for `plan`, nothing posted.
    pub(crate) fn new(plan: &ReadPlan) -> Self {
        let mut waiting = vec![0u32; plan.items];
        for c in &plan.chains {
            for &i in &c.items {
                waiting[i as usize] += 1;
            }
        }
        Self {
            chains: plan
                .chains
                .iter()
                .map(|c| (ChainState::Waiting, c.wrs.len() as u32, c.items.clone()))
                .collect(),
            waiting,
            failed: vec![None; plan.items],
            next: 0,
            in_flight: 0,
            any_failed: false,
        }
    }

    /// The next chain to post if it fits in a window of `window` WRs in flight (a chain longer
    /// than the window goes alone, so that the pull cannot stall), or `None`. Nothing is posted
    /// after a failure: the queue pair is in error by then.
    pub(crate) fn next_to_post(&self, window: usize) -> Option<usize> {
        if self.any_failed {
            return None;
        }
        let (_, wrs, _) = self.chains.get(self.next)?;
        let wrs = *wrs as usize;
        (self.in_flight == 0 || self.in_flight + wrs <= window).then_some(self.next)
    }

    /// Records that chain `chain` (the one [`Self::next_to_post`] named) was posted whole.
    pub(crate) fn posted(&mut self, chain: usize) {
        if chain != self.next {
            return;
        }
        if let Some((state, wrs, _)) = self.chains.get_mut(chain) {
            *state = ChainState::Posted;
            self.in_flight += *wrs as usize;
            self.next += 1;
        }
    }

    /// Applies one work completion: `status` [`WC_SUCCESS`] or an `ibv_wc_status` error.
    pub(crate) fn complete(&mut self, wr_id: u64, status: u32) -> Result<(), TrackError> {
        let (chain, pos) = split_wr_id(wr_id);
        let Some((state, wrs, items)) = self.chains.get_mut(chain as usize) else {
            return Err(TrackError::Unknown(wr_id));
        };
        if pos >= *wrs {
            return Err(TrackError::Unknown(wr_id));
        }
        let last = pos + 1 == *wrs;
        match (*state, status == WC_SUCCESS) {
            (ChainState::Waiting, _) => return Err(TrackError::NotPosted(wr_id)),
            (ChainState::Done | ChainState::Failed { settled: true, .. }, _) => {
                return Err(TrackError::Duplicate(wr_id));
            }
            // Only the last WR is signalled; a provider that reports an earlier success anyway
            // says nothing the last one will not.
            (ChainState::Posted, true) if !last => {}
            (ChainState::Posted, true) => {
                *state = ChainState::Done;
                self.in_flight -= *wrs as usize;
                for &i in items.iter() {
                    self.waiting[i as usize] -= 1;
                }
            }
            (ChainState::Posted, false) => {
                *state = ChainState::Failed {
                    status,
                    settled: last,
                };
                if last {
                    self.in_flight -= *wrs as usize;
                }
                self.any_failed = true;
                for &i in items.iter() {
                    self.failed[i as usize].get_or_insert(status);
                }
            }
            (ChainState::Failed { status: first, .. }, _) => {
                if last {
                    *state = ChainState::Failed {
                        status: first,
                        settled: true,
                    };
                    self.in_flight -= *wrs as usize;
                }
            }
        }
        Ok(())
    }

    /// WRs of posted chains whose last completion has not come.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether every chain was posted and has completed.
    pub(crate) fn is_finished(&self) -> bool {
        self.next == self.chains.len() && self.in_flight == 0
    }

    /// What became of each item, in order.
    pub(crate) fn outcomes(&self) -> Vec<ItemOutcome> {
        self.waiting
            .iter()
            .zip(&self.failed)
            .map(|(&waiting, failed)| match failed {
                Some(status) => ItemOutcome::Failed { status: *status },
                None if waiting == 0 => ItemOutcome::Done,
                None => ItemOutcome::Unfinished,
            })
            .collect()
    }
}
