//! The source side of a transfer: blocks pinned for peers, under unguessable ids, until the
//! puller releases them or they expire; and blocks held for pullers that have not asked yet (a
//! prefill engine's blocks handed to decode engines), until each hand-off has had its pull or
//! the hold expires. A hand-off that names a [`HoldTicket`] ends exactly its own holds, blocks
//! its decode did not pull included.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rayon::prelude::*;

use crate::host::Lease;
use crate::key::{BlockKey, Namespace};
use crate::stats::TierLevel;
use crate::store::TieredStore;

/// Bytes of blocks to checksum from which a grant spreads the work over rayon's threads (below
/// it, waking them costs more than it saves).
const PARALLEL_CHECKSUM_BYTES: u64 = 8 << 20;

/// Most blocks one grant may pin.
pub const MAX_GRANT_BLOCKS: usize = 65_536;

/// Most tickets one block is held under at once (a hot prefix handed to that many decodes
/// that have not pulled yet); a hold past it counts as one without a ticket, so that a hot
/// block does not grow the table without bound.
const MAX_TICKETS_PER_BLOCK: usize = 1024;

/// A grant's id: 128 random bits, so that only a caller the control channel answered can name it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrantId(pub [u8; 16]);

impl GrantId {
    fn random() -> Self {
        let mut id = [0u8; 16];
        id.copy_from_slice(&super::auth::random_nonce()[..16]);
        Self(id)
    }

    /// Parses the 16 bytes of an id.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Half is enough to tell grants apart in logs without handing out the capability.
        write!(
            f,
            "GrantId({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Names the holds made for one hand-off (a request a prefill engine hands to a decode engine),
/// so that the decode's pull of each rank ends that rank's, blocks it found elsewhere or did not
/// need included, and its giving up ends them all, without ending another hand-off's holds of
/// the same blocks. The holder picks it at random
/// per request and passes it along with the blocks' hashes; the wire's 0 is "no ticket".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HoldTicket(NonZeroU64);

impl HoldTicket {
    /// The ticket `value`; `None` for 0.
    pub fn new(value: u64) -> Option<Self> {
        NonZeroU64::new(value).map(Self)
    }

    /// Its value, never 0.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

/// Which holds the release of a grant ends ([`Grants::grant_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// None: a pull that reuses a prefix the cluster index found here (cross-node reuse) was
    /// not handed these blocks, and may not even move them.
    Nothing,
    /// One waiting hand-off of each granted block held since the grant was asked for: a pull
    /// that names no ticket (its engine or agent predates tickets).
    OneWaitPerBlock,
    /// Every hold made under this ticket in the granted blocks' namespace (one rank's); in
    /// every namespace if the grant expires unreleased instead.
    Ticket(HoldTicket),
}

/// One granted block, as the puller needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedBlock {
    /// Offset of the block in the source's arena.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// [`checksum`](crate::block::checksum) of its bytes as they were stored.
    pub checksum: u64,
    /// Where the source found it before pinning it in its arena.
    pub tier: TierLevel,
}

/// What [`Grants::grant`] hands out: the longest prefix of the asked keys that the source holds.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The id to pull and release with.
    pub id: GrantId,
    /// One entry per granted key, in the asked order.
    pub blocks: Vec<GrantedBlock>,
    /// How long the source keeps the blocks pinned if nobody releases them.
    pub ttl: Duration,
}

/// Pinned blocks of one grant; the pins go when the last holder (the table, or a data stream
/// still sending) drops it.
#[derive(Debug)]
pub struct GrantEntry {
    store: Arc<TieredStore>,
    leases: Vec<Lease>,
    /// When the grant began to be made.
    made: Instant,
    /// Which holds its release ends.
    ends: HoldEnd,
    expires: Instant,
}

impl GrantEntry {
    /// The bytes of block `index`, borrowed while the entry lives.
    pub fn block(&self, index: u32) -> Option<&[u8]> {
        let lease = self.leases.get(index as usize)?;
        Some(self.store.host().lease_data(lease))
    }

    /// Where block `index` lies in the source's arena.
    pub fn offset(&self, index: u32) -> Option<u64> {
        self.leases.get(index as usize).map(Lease::offset)
    }

    /// The namespace of its blocks: one grant request's, so one for all of them.
    fn namespace(&self) -> Option<Namespace> {
        self.leases.first().map(|l| l.key().namespace)
    }

    /// How many blocks the grant holds.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether the grant holds no block.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// When the grant expires unless released first: no transfer of its blocks should run on
    /// past it.
    pub fn expires(&self) -> Instant {
        self.expires
    }
}

impl Drop for GrantEntry {
    fn drop(&mut self) {
        for lease in self.leases.drain(..) {
            self.store.release(lease);
        }
    }
}

/// The grant table of one agent.
#[derive(Debug)]
pub struct Grants {
    store: Arc<TieredStore>,
    ttl: Duration,
    max_open: usize,
    table: Mutex<HashMap<GrantId, Arc<GrantEntry>>>,
    /// Grants being made, not in `table` yet.
    making: AtomicUsize,
    holds: Mutex<Holds>,
    /// Grants that expired unreleased, since the table was made.
    grants_expired: AtomicU64,
    /// Holds that ran out before their hand-off's pull or end, one per hand-off and block,
    /// since the table was made.
    holds_expired: AtomicU64,
}

/// How long [`Grants::hold`] keeps blocks, and how much of each tier it may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// A hold ends this long after it was last asked for, unless each hand-off it counts has
    /// had its pull first. Zero: nothing is held.
    pub ttl: Duration,
    /// Most bytes held in the host arena at once.
    pub host_bytes: u64,
    /// Most bytes held on disk at once.
    pub disk_bytes: u64,
}

impl HoldLimits {
    /// Holds nothing.
    pub const NONE: Self = Self {
        ttl: Duration::ZERO,
        host_bytes: 0,
        disk_bytes: 0,
    };
}

/// One held block: pinned in `tier` while hand-offs of it wait for their pulls, and until
/// `expires` at most.
#[derive(Debug, Clone)]
struct Held {
    tier: TierLevel,
    /// What the block takes in `tier` (its slot or record), counted against the limit.
    bytes: u64,
    /// Hand-offs without a ticket waiting for a pull: each such hold adds one, each pull of the
    /// block that names no ticket (a grant made since the first hold, released) takes one away
    /// (or, with none left, one of `tickets`).
    waiting: u32,
    /// The tickets of the hand-offs with one that hold the block, each once.
    tickets: Vec<HoldTicket>,
    /// When the block was first held: a grant made before it was not for these hand-offs.
    since: Instant,
    /// When its holds end at the latest (its last hold, plus the hold time), whichever
    /// tickets name it then.
    expires: Instant,
}

impl Held {
    /// Whether no hand-off waits for it any more.
    fn idle(&self) -> bool {
        self.waiting == 0 && self.tickets.is_empty()
    }
}

/// The blocks one ticket holds: one hand-off's, in the namespaces of all its ranks.
#[derive(Debug)]
struct TicketHolds {
    /// The blocks held under the ticket, and possibly some it no longer holds (a ticketless
    /// pull took the ticket off, or the block's hold ended), some of them twice: ending the
    /// ticket skips a block whose `tickets` do not name it.
    keys: Vec<BlockKey>,
    expires: Instant,
}

/// The blocks held now, and their bytes per tier.
#[derive(Debug)]
struct Holds {
    limits: HoldLimits,
    blocks: HashMap<BlockKey, Held>,
    tickets: HashMap<HoldTicket, TicketHolds>,
    host_bytes: u64,
    disk_bytes: u64,
    /// No hold expires before this (it may be earlier than the first expiry, after renewals):
    /// reaping before it has nothing to do, so a tier at its limit does not scan every hold
    /// on every hold.
    next_expiry: Option<Instant>,
}

impl Holds {
    /// The bytes held in `tier` (host or disk) and that tier's limit.
    fn room(&mut self, tier: TierLevel) -> (&mut u64, u64) {
        if tier == TierLevel::Host {
            (&mut self.host_bytes, self.limits.host_bytes)
        } else {
            (&mut self.disk_bytes, self.limits.disk_bytes)
        }
    }
}

/// What [`Grants::hold`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HoldOutcome {
    /// The tier of each leading stored key, as a lookup answers (held or not).
    pub tiers: Vec<TierLevel>,
    /// How many of them are held now (by this call or an earlier one), from the first: a hold
    /// stops at the first block that would pass its tier's limit.
    pub held: usize,
}

/// Held blocks and bytes, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeldCounts {
    /// Blocks held.
    pub blocks: usize,
    /// Their bytes in the host arena.
    pub host_bytes: u64,
    /// Their bytes on disk.
    pub disk_bytes: u64,
}

/// What expired in a grant table since it was made, for metrics: work a puller or a decode
/// engine neither finished nor gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpiredCounts {
    /// Grants that expired unreleased (their pullers died, gave up, or lost every try of the
    /// release). One under a ticket ends its hand-off's holds, which count here only.
    pub grants: u64,
    /// Holds that ran out with their hand-off still waiting for its pull (its decode engine
    /// died, or the request never reached one): one per hand-off and block, so a block two
    /// hand-offs held counts twice if neither is pulled, once if one is.
    pub holds: u64,
}

/// What ending a ticket's holds did.
#[derive(Debug, Default)]
struct Ended {
    /// Holds of blocks ended: the ticket's, one per block it still held.
    holds: usize,
    /// Blocks no longer held at all (no other hand-off waits for them).
    unpinned: usize,
}

/// One grant being made, counted in [`Grants::making`] until dropped.
struct Making<'a>(&'a AtomicUsize);

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no grant was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Too many keys in one request.
    #[error("{asked} keys asked in one grant; at most {MAX_GRANT_BLOCKS}")]
    TooManyKeys {
        /// How many were asked.
        asked: usize,
    },
    /// Too many grants open; old ones must be released or expire first.
    #[error("{open} grants open, the limit; retry after some are released")]
    TooManyGrants {
        /// How many are open.
        open: usize,
    },
}

impl Grants {
    /// A table over `store`, whose grants expire after `ttl`, with at most `max_open` at once.
    /// Holds nothing until [`Self::with_holds`].
    pub fn new(store: Arc<TieredStore>, ttl: Duration, max_open: usize) -> Self {
        Self {
            store,
            ttl,
            max_open,
            table: Mutex::new(HashMap::new()),
            making: AtomicUsize::new(0),
            holds: Mutex::new(Holds {
                limits: HoldLimits::NONE,
                blocks: HashMap::new(),
                tickets: HashMap::new(),
                host_bytes: 0,
                disk_bytes: 0,
                next_expiry: None,
            }),
            grants_expired: AtomicU64::new(0),
            holds_expired: AtomicU64::new(0),
        }
    }

    /// The same table, holding blocks within `limits` ([`Self::hold`]).
    #[must_use]
    pub fn with_holds(self, limits: HoldLimits) -> Self {
        self.holds.lock().limits = limits;
        self
    }

    /// The store whose blocks are granted.
    pub fn store(&self) -> &Arc<TieredStore> {
        &self.store
    }

    /// Pins the longest stored prefix of `keys` (promoting disk blocks into the arena) and
    /// checksums it (a block is read for that once in its life at most:
    /// [`HostTier::checksum`](crate::host::HostTier::checksum)). An empty prefix makes no grant
    /// entry but still answers.
    pub fn grant(&self, keys: &[BlockKey]) -> Result<Grant, GrantError> {
        self.grant_for(keys, HoldEnd::OneWaitPerBlock)
    }

    /// [`Self::grant`] whose release ends the holds `ends` names. A grant under a ticket that
    /// finds none of the blocks ends the ticket's holds in their namespace at once: no pull of
    /// them follows.
    pub fn grant_for(&self, keys: &[BlockKey], ends: HoldEnd) -> Result<Grant, GrantError> {
        let made = Instant::now();
        if keys.len() > MAX_GRANT_BLOCKS {
            return Err(GrantError::TooManyKeys { asked: keys.len() });
        }
        self.expire();
        // Counted as open from here, so that grants made at once cannot pass the limit together.
        let _making = {
            let table = self.table.lock();
            let open = table.len() + self.making.load(Ordering::Acquire);
            if open >= self.max_open {
                return Err(GrantError::TooManyGrants { open });
            }
            self.making.fetch_add(1, Ordering::AcqRel);
            Making(&self.making)
        };
        // Only the stored prefix is acquired: blocks of lower tiers past its end would be
        // promoted (taking the arena's room) for nothing.
        let prefix = self.store.lookup_prefix(keys).len;
        let mut leases = Vec::new();
        let mut tiers = Vec::new();
        let mut acquired = self.store.acquire_batch_tiered(&keys[..prefix]).into_iter();
        for got in acquired.by_ref() {
            let Some((lease, tier)) = got else { break };
            leases.push(lease);
            tiers.push(tier);
        }
        // Hits past the first miss are not part of the prefix.
        for lease in acquired.flatten() {
            self.store.release(lease.0);
        }
        let blocks = leases
            .iter()
            .zip(tiers)
            .zip(self.checksums(&leases))
            .map(|((lease, tier), checksum)| GrantedBlock {
                offset: lease.offset(),
                len: lease.len(),
                checksum,
                tier,
            })
            .collect();
        let id = GrantId::random();
        if !leases.is_empty() {
            let entry = GrantEntry {
                store: Arc::clone(&self.store),
                leases,
                made,
                ends,
                expires: Instant::now() + self.ttl,
            };
            self.table.lock().insert(id, Arc::new(entry));
        } else if let (HoldEnd::Ticket(ticket), Some(first)) = (ends, keys.first()) {
            // Only this rank's: the next rank's pull still comes, and may find its blocks.
            self.unhold(first.namespace, ticket);
        }
        Ok(Grant {
            id,
            blocks,
            ttl: self.ttl,
        })
    }

    /// The checksums of leased blocks. Those not known yet are computed on several cores when
    /// they add up to enough bytes: a long prefix of blocks an engine saved is read in full
    /// before the grant answers, and the puller waits for it.
    fn checksums(&self, leases: &[Lease]) -> Vec<u64> {
        let host = self.store.host();
        let unknown: u64 = leases
            .iter()
            .filter(|l| host.known_checksum(l.key()).is_none())
            .map(Lease::len)
            .sum();
        if unknown < PARALLEL_CHECKSUM_BYTES {
            leases.iter().map(|l| host.checksum(l)).collect()
        } else {
            leases.par_iter().map(|l| host.checksum(l)).collect()
        }
    }

    /// The live grant `id`, to read its blocks (they stay pinned while the `Arc` lives).
    pub fn get(&self, id: &GrantId) -> Option<Arc<GrantEntry>> {
        let table = self.table.lock();
        let e = table.get(id)?;
        (e.expires > Instant::now()).then(|| Arc::clone(e))
    }

    /// Unpins a grant; `false` when it was unknown (already released or expired). The
    /// hand-off it was pulled for has had its pull (or its puller gave up): the holds its
    /// [`HoldEnd`] names end.
    pub fn release(&self, id: &GrantId) -> bool {
        // Dropped outside the lock: releasing leases takes the host tier's lock.
        let removed = self.table.lock().remove(id);
        let Some(entry) = removed.as_ref() else {
            return false;
        };
        match entry.ends {
            HoldEnd::Nothing => {}
            HoldEnd::Ticket(ticket) => {
                if let Some(ns) = entry.namespace() {
                    self.unhold(ns, ticket);
                }
            }
            HoldEnd::OneWaitPerBlock => {
                let mut guard = self.holds.lock();
                let holds = &mut *guard;
                for key in entry.leases.iter().map(Lease::key) {
                    let Some(h) = holds.blocks.get_mut(key).filter(|h| h.since <= entry.made) else {
                        continue;
                    };
                    // A puller that names no ticket pulled for one of the hand-offs, whichever
                    // (its agent predates tickets, or the hold had none): the oldest ticket,
                    // failing a ticketless wait. The ticket keeps the key in its list: ending
                    // it skips a block it no longer holds.
                    if h.waiting > 0 {
                        h.waiting -= 1;
                    } else if !h.tickets.is_empty() {
                        h.tickets.remove(0);
                    }
                    if h.idle() {
                        self.end_hold(holds, key);
                    }
                }
            }
        }
        true
    }

    /// Holds the longest stored prefix of `keys` where it is (host arena or disk) for a puller
    /// that has not asked for it yet (a decode engine continuing a request this node's engine
    /// prefilled). A held block is not evicted from its tier while a hold of it waits for its
    /// pull. A hold under a `ticket` ends when the pull that names the ticket releases its
    /// grant ([`HoldEnd::Ticket`]: the holds in the grant's namespace, one rank's), at
    /// [`Self::unhold`] (one namespace's), and when such a grant expires unreleased or at
    /// [`Self::end_hand_off`] (every namespace's); a hold without one counts one wait, which
    /// the release of any later grant of the block that names no ticket ends (that release
    /// ends one ticket's hold of the block where no ticketless wait is left). All end
    /// [`HoldLimits::ttl`] after the block's last hold at most. Blocks only in the object
    /// store are not held (nothing evicts them there); a hold stops at the first block that
    /// would pass its tier's limit. Blocks in lower tiers are looked for until `until` at
    /// most.
    pub fn hold(&self, keys: &[BlockKey], until: Instant, ticket: Option<HoldTicket>) -> HoldOutcome {
        let keys = &keys[..keys.len().min(MAX_GRANT_BLOCKS)];
        let tiers = self.store.lookup_prefix_until(keys, until).tiers;
        let mut guard = self.holds.lock();
        let holds = &mut *guard;
        if holds.limits.ttl.is_zero() {
            return HoldOutcome { tiers, held: 0 };
        }
        let now = Instant::now();
        let expires = now + holds.limits.ttl;
        let mut reaped = false;
        let mut held = 0;
        for key in &keys[..tiers.len()] {
            if let Some(h) = holds.blocks.get_mut(key) {
                h.expires = expires;
                match ticket {
                    // Held under this ticket already: renewed.
                    Some(t) if h.tickets.contains(&t) => {
                        ticket_holds(holds, t, expires);
                    }
                    Some(t) if h.tickets.len() < MAX_TICKETS_PER_BLOCK => {
                        h.tickets.push(t);
                        ticket_holds(holds, t, expires).keys.push(*key);
                    }
                    _ => h.waiting = h.waiting.saturating_add(1),
                }
                held += 1;
                continue;
            }
            // Pinned before its size is known; unpinned again where it does not fit.
            let Some((tier, len)) = self.store.pin(key).filter(|(t, _)| *t != TierLevel::Object) else {
                break;
            };
            let bytes = match tier {
                TierLevel::Host => crate::alloc::slot_size_for(len),
                _ => crate::disk::record_len(len),
            };
            let fits = |holds: &mut Holds| {
                let (used, limit) = holds.room(tier);
                used.saturating_add(bytes) <= limit
            };
            if !fits(holds) && !reaped {
                // Holds past their time may not have been reaped yet.
                reaped = true;
                self.expire_holds_locked(holds, now);
            }
            if !fits(holds) {
                self.unpin(tier, key);
                break;
            }
            *holds.room(tier).0 += bytes;
            let hold = Held {
                tier,
                bytes,
                waiting: u32::from(ticket.is_none()),
                tickets: ticket.into_iter().collect(),
                since: now,
                expires,
            };
            holds.blocks.insert(*key, hold);
            if let Some(t) = ticket {
                ticket_holds(holds, t, expires).keys.push(*key);
            }
            held += 1;
        }
        if held > 0 {
            holds.next_expiry = Some(holds.next_expiry.map_or(expires, |n| n.min(expires)));
        }
        HoldOutcome { tiers, held }
    }

    /// Ends the holds made under `ticket` in `ns` now (that rank of the hand-off will not be
    /// pulled, or its holder gave up on it); returns how many blocks are no longer held.
    pub fn unhold(&self, ns: Namespace, ticket: HoldTicket) -> usize {
        self.end_ticket(&mut self.holds.lock(), ticket, Some(ns)).unpinned
    }

    /// Ends every hold made under `ticket`, in every namespace: the whole hand-off, all its
    /// ranks (its decode computes the request, or needs none of its blocks); returns how many
    /// blocks are no longer held.
    pub fn end_hand_off(&self, ticket: HoldTicket) -> usize {
        self.end_ticket(&mut self.holds.lock(), ticket, None).unpinned
    }

    /// Takes `ticket` off the blocks it holds (in namespace `only`, or in all), ending the
    /// holds of those no other hand-off waits for.
    fn end_ticket(&self, holds: &mut Holds, ticket: HoldTicket, only: Option<Namespace>) -> Ended {
        let Some(mut held) = holds.tickets.remove(&ticket) else {
            return Ended::default();
        };
        let ending = match only {
            None => std::mem::take(&mut held.keys),
            Some(ns) => {
                // The other ranks' blocks stay under the ticket for their own pulls (a
                // hand-off has a few ranks: each rank's end rescans only the ranks' keys left).
                let (ending, kept): (Vec<BlockKey>, Vec<BlockKey>) = std::mem::take(&mut held.keys)
                    .into_iter()
                    .partition(|k| k.namespace == ns);
                if !kept.is_empty() {
                    held.keys = kept;
                    holds.tickets.insert(ticket, held);
                }
                ending
            }
        };
        let mut ended = Ended::default();
        for key in &ending {
            let Some(h) = holds.blocks.get_mut(key) else {
                continue;
            };
            let Some(at) = h.tickets.iter().position(|t| *t == ticket) else {
                continue;
            };
            h.tickets.swap_remove(at);
            ended.holds += 1;
            if h.idle() {
                self.end_hold(holds, key);
                ended.unpinned += 1;
            }
        }
        ended
    }

    /// Ends the hold of `key`, if held.
    fn end_hold(&self, holds: &mut Holds, key: &BlockKey) {
        if let Some(h) = holds.blocks.remove(key) {
            *holds.room(h.tier).0 -= h.bytes;
            self.unpin(h.tier, key);
        }
    }

    fn unpin(&self, tier: TierLevel, key: &BlockKey) {
        match tier {
            TierLevel::Host => self.store.host().unpin(key),
            _ => self.store.disk().is_some_and(|d| d.unpin(key)),
        };
    }

    /// Blocks held now and their bytes.
    pub fn held(&self) -> HeldCounts {
        let holds = self.holds.lock();
        HeldCounts {
            blocks: holds.blocks.len(),
            host_bytes: holds.host_bytes,
            disk_bytes: holds.disk_bytes,
        }
    }

    /// What expired since the table was made.
    pub fn expired(&self) -> ExpiredCounts {
        ExpiredCounts {
            grants: self.grants_expired.load(Ordering::Relaxed),
            holds: self.holds_expired.load(Ordering::Relaxed),
        }
    }

    /// Ends the holds that expired; returns how many.
    pub fn expire_holds(&self) -> usize {
        self.expire_holds_at(Instant::now())
    }

    fn expire_holds_at(&self, now: Instant) -> usize {
        let ended = self.expire_holds_locked(&mut self.holds.lock(), now);
        if ended > 0 {
            tracing::debug!(blocks = ended, "holds for pullers expired unpulled");
        }
        ended
    }

    fn expire_holds_locked(&self, holds: &mut Holds, now: Instant) -> usize {
        if holds.next_expiry.is_none_or(|next| next > now) {
            return 0;
        }
        // Tickets first: a block whose holds were all under expired tickets ends with them,
        // while one that a later hold renewed stays for it.
        let tickets: Vec<HoldTicket> = holds
            .tickets
            .iter()
            .filter(|(_, t)| t.expires <= now)
            .map(|(ticket, _)| *ticket)
            .collect();
        let mut ended = Ended::default();
        for ticket in tickets {
            let by_ticket = self.end_ticket(holds, ticket, None);
            ended.holds += by_ticket.holds;
            ended.unpinned += by_ticket.unpinned;
        }
        let mut expired = Vec::new();
        let mut next = None::<Instant>;
        let mut sooner = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        for (key, h) in &holds.blocks {
            if h.expires <= now {
                expired.push(*key);
                // Every hand-off still waiting for the block: ticketless ones and those whose
                // ticket a later hold of other blocks renewed.
                ended.holds += h.waiting as usize + h.tickets.len();
            } else {
                sooner(h.expires);
            }
        }
        for t in holds.tickets.values() {
            sooner(t.expires);
        }
        holds.next_expiry = next;
        for key in &expired {
            self.end_hold(holds, key);
        }
        self.holds_expired
            .fetch_add(ended.holds as u64, Ordering::Relaxed);
        ended.unpinned + expired.len()
    }

    /// Drops expired grants; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut gone = Vec::new();
        self.table.lock().retain(|_, e| {
            let keep = e.expires > now;
            if !keep {
                gone.push(Arc::clone(e));
            }
            keep
        });
        if !gone.is_empty() {
            tracing::debug!(grants = gone.len(), "peer grants expired unreleased");
            self.grants_expired
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
        }
        // Their pullers died or gave up: no pull of those hand-offs is coming, of this rank or
        // of the ranks after it (a decode computes a request one of whose ranks failed).
        let tickets: Vec<HoldTicket> = gone
            .iter()
            .filter_map(|e| match e.ends {
                HoldEnd::Ticket(t) => Some(t),
                _ => None,
            })
            .collect();
        if !tickets.is_empty() {
            let mut holds = self.holds.lock();
            for ticket in tickets {
                self.end_ticket(&mut holds, ticket, None);
            }
        }
        gone.len()
    }

    /// How many grants are open.
    pub fn open(&self) -> usize {
        self.table.lock().len()
    }
}

/// The blocks `ticket` holds, renewed until `expires`.
fn ticket_holds(holds: &mut Holds, ticket: HoldTicket, expires: Instant) -> &mut TicketHolds {
    let t = holds.tickets.entry(ticket).or_insert_with(|| TicketHolds {
        keys: Vec::new(),
        expires,
    });
    t.expires = expires;
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::checksum;
    use crate::transport::test_support::{key, payload, store};

    #[test]
    fn grants_pin_a_prefix_until_released_or_expired() {
        let s = store(8);
        for i in [0, 1, 3] {
            s.put(&key(i), &[i as u8; 4096]);
        }
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let grant = g.grant(&[key(0), key(1), key(2), key(3)]).unwrap();
        assert_eq!(grant.blocks.len(), 2, "stops at the first missing key");
        assert_eq!(grant.blocks[1].checksum, checksum(&[1u8; 4096]));
        let entry = g.get(&grant.id).unwrap();
        assert_eq!(entry.block(1), Some(&[1u8; 4096][..]));
        assert_eq!(entry.block(2), None);
        drop(entry);
        assert!(g.release(&grant.id));
        assert!(!g.release(&grant.id));
        assert!(g.get(&grant.id).is_none());

        let short = Grants::new(Arc::clone(&s), Duration::ZERO, 1);
        let grant = short.grant(&[key(0)]).unwrap();
        assert!(short.get(&grant.id).is_none(), "expired at once");
        assert_eq!(short.expire(), 1);
        assert_eq!(short.open(), 0);
        // Nothing stored: an answer with no blocks and no entry.
        let none = g.grant(&[key(9)]).unwrap();
        assert!(none.blocks.is_empty() && g.open() == 0);
    }

    #[test]
    fn a_block_is_read_for_its_checksum_once() {
        let s = store(8);
        s.put(&key(0), &[7; 4096]);
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let first = g.grant(&[key(0)]).unwrap();
        assert_eq!(first.blocks[0].checksum, checksum(&[7u8; 4096]));
        assert!(g.release(&first.id));
        // The block's bytes change behind the tier's back: the next grant still announces what
        // was stored, so a puller's check catches the change instead of vouching for it.
        // SAFETY: the block's slot, inside the arena; nothing reads or writes it meanwhile.
        unsafe { s.host().arena().write_at(first.blocks[0].offset, &[8; 16]) };
        let second = g.grant(&[key(0)]).unwrap();
        assert_eq!(second.blocks[0].checksum, first.blocks[0].checksum);

        // A writer's noted checksum is what a grant announces: the block is not read for it.
        let mut r = s.reserve_batch(&[(key(1), 4096)]).pop().unwrap().unwrap();
        r.note_checksum(0xfeed);
        s.host().write(&r, &[1; 4096]);
        s.commit(r);
        assert_eq!(g.grant(&[key(1)]).unwrap().blocks[0].checksum, 0xfeed);
    }

    #[test]
    fn a_long_prefix_is_checksummed_in_parallel_in_order() {
        let s = store(64);
        let data: Vec<Vec<u8>> = (0..12).map(|i| payload(i, 1 << 20)).collect();
        for (i, d) in data.iter().enumerate() {
            s.put(&key(i as u64), d);
        }
        let keys: Vec<BlockKey> = (0..12).map(key).collect();
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let grant = g.grant(&keys).unwrap();
        const { assert!(12 << 20 >= PARALLEL_CHECKSUM_BYTES) };
        let sums: Vec<u64> = grant.blocks.iter().map(|b| b.checksum).collect();
        assert_eq!(sums, data.iter().map(|d| checksum(d)).collect::<Vec<_>>());
    }

    #[test]
    fn limits_are_enforced() {
        let s = store(8);
        s.put(&key(0), &[0; 4096]);
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 1);
        g.grant(&[key(0)]).unwrap();
        assert_eq!(
            g.grant(&[key(0)]).unwrap_err(),
            GrantError::TooManyGrants { open: 1 }
        );
        let many = vec![key(0); MAX_GRANT_BLOCKS + 1];
        assert!(matches!(g.grant(&many), Err(GrantError::TooManyKeys { .. })));
    }

    /// Grants asked for at once never open more than the limit between them.
    #[test]
    fn the_grant_limit_holds_for_grants_made_at_once() {
        let s = store(64);
        let keys: Vec<BlockKey> = (0..8).map(key).collect();
        for (i, k) in keys.iter().enumerate() {
            s.put(k, &payload(i as u64, 1 << 20));
        }
        for round in 0..5 {
            let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 3);
            let start = std::sync::Barrier::new(12);
            let made = std::thread::scope(|scope| {
                let tries: Vec<_> = (0..12)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            g.grant(&keys).is_ok()
                        })
                    })
                    .collect();
                tries
                    .into_iter()
                    .filter_map(|t| t.join().ok())
                    .filter(|ok| *ok)
                    .count()
            });
            assert_eq!((made, g.open()), (3, 3), "round {round}");
        }
    }

    fn holding(s: &Arc<TieredStore>, ttl: Duration, host_bytes: u64) -> Grants {
        Grants::new(Arc::clone(s), Duration::from_secs(60), 4).with_holds(HoldLimits {
            ttl,
            host_bytes,
            disk_bytes: 64 << 20,
        })
    }

    fn hold(g: &Grants, keys: &[BlockKey]) -> HoldOutcome {
        g.hold(keys, Instant::now() + Duration::from_secs(1), None)
    }

    fn hold_under(g: &Grants, keys: &[BlockKey], ticket: u64) -> usize {
        g.hold(
            keys,
            Instant::now() + Duration::from_secs(1),
            HoldTicket::new(ticket),
        )
        .held
    }

    fn ticket(t: u64) -> HoldTicket {
        HoldTicket::new(t).unwrap()
    }

    /// Fills an 8 MiB arena with blocks the test never asks for again.
    fn pressure(s: &TieredStore, from: u64) {
        for i in from..from + 16 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
    }

    /// A grant of `keys`, pulled and released.
    fn pulled(g: &Grants, keys: &[BlockKey]) {
        let grant = g.grant(keys).unwrap();
        assert!(g.release(&grant.id));
    }

    #[test]
    fn held_blocks_stay_until_a_grant_of_them_is_released() {
        let s = store(8);
        for i in 0..5 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let keys: Vec<BlockKey> = (0..4).map(key).collect();
        // A grant made before the hold was not for it.
        let earlier = g_grant_for(&s, &keys);
        let g = earlier.0;
        let out = hold(&g, &keys);
        assert_eq!((out.tiers, out.held), (vec![TierLevel::Host; 4], 4));
        assert!(g.release(&earlier.1));
        assert_eq!(g.held().blocks, 4, "an earlier grant's release ends no hold");
        pressure(&s, 100);
        assert!(s.contains(&key(4)).is_none(), "a block not held was evicted");
        for k in &keys {
            assert_eq!(s.contains(k), Some(TierLevel::Host), "held through the pressure");
        }
        assert_eq!(
            g.held(),
            HeldCounts {
                blocks: 4,
                host_bytes: 4 * crate::alloc::slot_size_for(1 << 20),
                disk_bytes: 0
            }
        );
        // A grant of the first three, released: their holds end, the fourth stays held.
        pulled(&g, &keys[..3]);
        assert_eq!(g.held().blocks, 1);
        pressure(&s, 200);
        for k in &keys[..3] {
            assert!(s.contains(k).is_none(), "no pin left after the release");
        }
        assert_eq!(s.contains(&keys[3]), Some(TierLevel::Host));
        assert_eq!(g.expired(), ExpiredCounts::default());
        assert_eq!(g.expire_holds_at(Instant::now() + Duration::from_secs(61)), 1);
        assert_eq!(g.held(), HeldCounts::default());
        assert_eq!(
            g.expired(),
            ExpiredCounts { grants: 0, holds: 1 },
            "the released grants did not expire; the unpulled hold did"
        );
        pressure(&s, 300);
        assert!(s.contains(&keys[3]).is_none(), "no pin left after the expiry");
    }

    /// A grant table and a grant of `keys` made on it before any hold.
    fn g_grant_for(s: &Arc<TieredStore>, keys: &[BlockKey]) -> (Grants, GrantId) {
        let g = holding(s, Duration::from_secs(60), 8 << 20);
        let id = g.grant(keys).unwrap().id;
        (g, id)
    }

    /// Two requests sharing a prefix, handed to two decodes: the prefix stays held until both
    /// have pulled it.
    #[test]
    fn a_block_handed_over_twice_is_held_until_both_pulls() {
        let s = store(8);
        for i in 0..3 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        let (first, second) = ([key(0), key(1)], [key(0), key(2)]);
        assert_eq!(hold(&g, &first).held, 2);
        assert_eq!(hold(&g, &second).held, 2);
        // Another node reusing the prefix is not one of the decodes it was handed to.
        let reuse = g.grant_for(&first, HoldEnd::Nothing).unwrap();
        assert!(g.release(&reuse.id));
        assert_eq!(g.held().blocks, 3, "a reuse pull ends no hold");
        pulled(&g, &first);
        assert_eq!(g.held().blocks, 2, "key 0 still waits for the second pull");
        pressure(&s, 100);
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Host));
        assert!(s.contains(&key(1)).is_none());
        pulled(&g, &second);
        assert_eq!(g.held(), HeldCounts::default());
    }

    #[test]
    fn a_hold_stops_at_its_tiers_limit_and_without_a_ttl_holds_nothing() {
        let s = store(8);
        for i in 0..4 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let keys: Vec<BlockKey> = (0..6).map(key).collect();
        let off = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let out = hold(&off, &keys);
        assert_eq!((out.tiers.len(), out.held), (4, 0), "answers like a lookup");
        let g = holding(&s, Duration::from_secs(60), (5 << 20) / 2);
        let out = hold(&g, &keys);
        assert_eq!((out.tiers.len(), out.held), (4, 2));
        assert_eq!(g.expire_holds(), 0, "not expired yet");
        pressure(&s, 100);
        assert_eq!(s.contains(&key(1)), Some(TierLevel::Host));
        assert!(
            s.contains(&key(2)).is_none(),
            "the block past the limit was not left pinned"
        );
        // A tier at its limit: holds that expired make room (no reaping ran since).
        let short = holding(&s, Duration::from_nanos(1), (5 << 20) / 2);
        for i in 10..14 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let later: Vec<BlockKey> = (10..14).map(key).collect();
        assert_eq!(hold(&short, &later[..2]).held, 2);
        assert_eq!(hold(&short, &later[2..]).held, 2, "the expired holds made room");
        assert_eq!(short.held().blocks, 2);
    }

    /// A block on disk is held there (not promoted for it); a grant promotes it to the arena,
    /// and its release ends the disk pin.
    #[test]
    fn a_block_on_disk_is_held_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(
            TieredStore::open(crate::store::StoreConfig {
                host: crate::host::HostTierConfig::new(8 << 20),
                disk: Some(crate::disk::DiskTierConfig {
                    slab_size: 4 << 20,
                    direct_io: false,
                    ..crate::disk::DiskTierConfig::new(dir.path(), 64 << 20)
                }),
                object: None,
            })
            .unwrap(),
        );
        s.put(&key(0), &payload(0, 1 << 20));
        pressure(&s, 100);
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Disk), "demoted");
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        let out = hold(&g, &[key(0)]);
        assert_eq!((out.tiers, out.held), (vec![TierLevel::Disk], 1));
        assert_eq!(g.held().disk_bytes, crate::disk::record_len(1 << 20));
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Disk), "held where it was");
        pulled(&g, &[key(0)]);
        assert_eq!(g.held(), HeldCounts::default());
        assert!(
            !s.disk().unwrap().unpin(&key(0)),
            "the disk pin ended with the hold"
        );
    }

    /// Two hand-offs share a block: the pull under one ticket ends that ticket's holds, the
    /// block its decode did not pull included, and leaves the other's.
    #[test]
    fn a_ticket_ends_its_own_holds_and_only_them() {
        let s = store(8);
        for i in 0..4 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        assert_eq!(hold_under(&g, &[key(0), key(1), key(2)], 7), 3);
        assert_eq!(hold_under(&g, &[key(0), key(3)], 9), 2);
        assert_eq!(
            hold_under(&g, &[key(0), key(1)], 7),
            2,
            "renewed, not counted twice"
        );
        // The decode under ticket 7 found block 0 in its own node and pulled only block 1.
        let pull = g.grant_for(&[key(1)], HoldEnd::Ticket(ticket(7))).unwrap();
        assert_eq!(g.held().blocks, 4, "held until the pull ends");
        assert!(g.release(&pull.id));
        assert_eq!(
            g.held().blocks,
            2,
            "blocks 1 and 2 ended with ticket 7; 0 and 3 wait for 9"
        );
        pressure(&s, 100);
        assert!(s.contains(&key(1)).is_none() && s.contains(&key(2)).is_none());
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Host));
        assert_eq!(g.unhold(key(0).namespace, ticket(7)), 0, "ended already");
        assert_eq!(g.unhold(key(0).namespace, ticket(9)), 2);
        assert_eq!(g.held(), HeldCounts::default());
        assert!(g.holds.lock().tickets.is_empty());
        pressure(&s, 200);
        assert!(s.contains(&key(0)).is_none(), "no pin left after the unhold");
    }

    /// A puller that names no ticket (an agent before tickets) ends one hand-off of each block
    /// it pulled, ticket or not; a grant under a ticket that finds nothing ends the ticket.
    #[test]
    fn pulls_without_a_ticket_and_empty_grants_end_holds_too() {
        let s = store(8);
        for i in 0..3 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        assert_eq!(hold_under(&g, &[key(0), key(1)], 7), 2);
        pulled(&g, &[key(0)]);
        assert_eq!(g.held().blocks, 1, "block 0's only hand-off had its pull");
        assert_eq!(g.unhold(key(0).namespace, ticket(7)), 1, "block 1 still under 7");

        assert_eq!(hold_under(&g, &[key(2)], 8), 1);
        let nothing = g.grant_for(&[key(40)], HoldEnd::Ticket(ticket(8))).unwrap();
        assert!(nothing.blocks.is_empty());
        assert_eq!(g.held(), HeldCounts::default(), "no pull of ticket 8 will come");
    }

    /// Holds under a ticket expire with it, and the table forgets the ticket.
    #[test]
    fn tickets_expire_with_their_holds() {
        let s = store(8);
        for i in 0..3 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        assert_eq!(hold_under(&g, &[key(0), key(1)], 7), 2);
        assert_eq!(hold(&g, &[key(1), key(2)]).held, 2);
        assert_eq!(g.expire_holds_at(Instant::now() + Duration::from_secs(61)), 3);
        assert_eq!(g.held(), HeldCounts::default());
        assert!(g.holds.lock().tickets.is_empty());
        pressure(&s, 100);
        for i in 0..3 {
            assert!(s.contains(&key(i)).is_none(), "no pin left after the expiry");
        }
    }

    /// Expired holds are counted once per hand-off and block: a block two hand-offs hold counts
    /// for the one whose ticket ran out while the other still waits (and not again when that
    /// one ends), a renewed ticket counts nothing until it runs out, a ticket and its block
    /// running out at once count once, and each ticketless hand-off of a block counts.
    #[test]
    fn expired_holds_are_counted_per_hand_off_and_block() {
        let s = store(8);
        for i in 0..3 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let ttl = Duration::from_secs(60);
        let g = holding(&s, ttl, 8 << 20);
        let after = |at: Instant| while Instant::now() == at {};
        // Ticket 1 holds blocks 0 and 1; ticket 2, a moment later, blocks 1 and 2.
        assert_eq!(hold_under(&g, &[key(0), key(1)], 1), 2);
        let between = Instant::now();
        after(between);
        assert_eq!(hold_under(&g, &[key(1), key(2)], 2), 2);
        assert_eq!(
            g.expire_holds_at(between + ttl),
            1,
            "block 1 still held for ticket 2"
        );
        assert_eq!(g.expired().holds, 2, "ticket 1's holds of both blocks");
        assert_eq!(g.end_hand_off(ticket(2)), 2);
        assert_eq!(g.held(), HeldCounts::default());
        assert_eq!(g.expired().holds, 2, "a hand-off that ended is not counted");

        assert_eq!(hold_under(&g, &[key(0)], 3), 1);
        let first = Instant::now();
        after(first);
        assert_eq!(hold_under(&g, &[key(0)], 3), 1);
        assert_eq!(g.expire_holds_at(first + ttl), 0, "renewed");
        assert_eq!(g.expired().holds, 2);
        let later = Instant::now() + ttl;
        assert_eq!(g.expire_holds_at(later), 1);
        assert_eq!(g.expired().holds, 3, "the ticket's hold and its block's, once");

        assert_eq!(hold(&g, &[key(2)]).held, 1);
        assert_eq!(hold(&g, &[key(2)]).held, 1);
        assert_eq!(g.expire_holds_at(Instant::now() + ttl), 1);
        assert_eq!(g.expired().holds, 5, "two ticketless hand-offs of the block");
        assert_eq!(g.expired().grants, 0);
    }

    /// A block held under more tickets than a block keeps counts the extra hand-offs as
    /// waits without one: still held for them, ended by a pull that names none.
    #[test]
    fn holds_past_a_blocks_ticket_limit_wait_without_one() {
        let s = store(8);
        s.put(&key(0), &payload(0, 1 << 20));
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        let over = MAX_TICKETS_PER_BLOCK as u64 + 1;
        for t in 1..=over {
            assert_eq!(hold_under(&g, &[key(0)], t), 1);
        }
        for t in 1..=over {
            g.unhold(key(0).namespace, ticket(t));
        }
        assert_eq!(g.held().blocks, 1, "the hand-off past the limit still waits");
        pulled(&g, &[key(0)]);
        assert_eq!(g.held(), HeldCounts::default());
    }

    /// Block `i` in another namespace than [`key`]'s: rank 1 of a tensor-parallel pair.
    fn rank1_key(i: u64) -> BlockKey {
        let ns = Namespace::builder("m").tensor_parallel(1, 2).build();
        BlockKey::new(ns, crate::BlockHash::from_u64(i))
    }

    /// One ticket holds a hand-off's blocks of every rank: a rank's pull ends that rank's
    /// holds only (the next rank's pull is still to come); ending the hand-off ends the rest,
    /// and leaves another ticket's holds of the same blocks.
    #[test]
    fn a_hand_off_ends_rank_by_rank_or_as_a_whole() {
        let s = store(16);
        for i in 0..2 {
            s.put(&key(i), &payload(i, 1 << 20));
            s.put(&rank1_key(i), &payload(i + 10, 1 << 20));
        }
        let g = holding(&s, Duration::from_secs(60), 16 << 20);
        assert_eq!(hold_under(&g, &[key(0), key(1)], 7), 2);
        assert_eq!(hold_under(&g, &[rank1_key(0), rank1_key(1)], 7), 2);
        assert_eq!(hold_under(&g, &[rank1_key(0)], 9), 1);
        let rank0 = g
            .grant_for(&[key(0), key(1)], HoldEnd::Ticket(ticket(7)))
            .unwrap();
        assert!(g.release(&rank0.id));
        assert_eq!(g.held().blocks, 2, "rank 1's blocks wait for rank 1's pull");
        assert_eq!(g.unhold(key(0).namespace, ticket(7)), 0, "rank 0's ended already");
        assert_eq!(
            g.end_hand_off(ticket(7)),
            1,
            "rank 1's block 1 (block 0 waits for 9)"
        );
        assert_eq!(g.held().blocks, 1);
        assert!(!g.holds.lock().tickets.contains_key(&ticket(7)));
        assert_eq!(g.end_hand_off(ticket(9)), 1);
        assert_eq!(g.held(), HeldCounts::default());
    }

    /// A grant under a ticket that its puller never releases ends the ticket's holds when it
    /// expires, every rank's: that pull is not coming back, nor are the later ranks'.
    #[test]
    fn a_ticket_ends_when_its_grant_expires_unreleased() {
        let s = store(8);
        for i in 0..2 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        s.put(&rank1_key(0), &payload(10, 1 << 20));
        let g = Grants::new(Arc::clone(&s), Duration::ZERO, 4).with_holds(HoldLimits {
            ttl: Duration::from_secs(60),
            host_bytes: 8 << 20,
            disk_bytes: 0,
        });
        assert_eq!(hold_under(&g, &[key(0), key(1)], 7), 2);
        assert_eq!(hold_under(&g, &[rank1_key(0)], 7), 1);
        g.grant_for(&[key(0)], HoldEnd::Ticket(ticket(7))).unwrap();
        assert_eq!(g.held().blocks, 3);
        assert_eq!(g.expire(), 1);
        assert_eq!(g.held(), HeldCounts::default());
        assert_eq!(
            g.expired(),
            ExpiredCounts { grants: 1, holds: 0 },
            "the holds ended with the hand-off, not by their own expiry"
        );
    }
}
