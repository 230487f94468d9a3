use std::collections::{BTreeSet, VecDeque};
use std::net::{Ipv6Addr, SocketAddrV6};

use proptest::prelude::*;

use super::device::{list_devices, pick_device};
use super::endpoint::{HELLO_LEN, hello, hello_matches};
use super::pump::{PostError, ReadQueue, WC_FLUSHED};
use super::wr::{ItemOutcome, ReadLimits, ReadPlan, ReadWr, TrackError, WC_SUCCESS, split_wr_id, wr_id};
use super::*;
use crate::transport::test_support::{key, payload, soon, store};

/// `ibv_wc_status` values the tests use.
const WC_REM_ACCESS_ERR: u32 = 10;
const WC_RETRY_EXC_ERR: u32 = 12;

fn describe(status: u32) -> String {
    format!("status {status}")
}

fn limits(max_msg: u64, max_sge: usize, max_chain: usize) -> ReadLimits {
    ReadLimits {
        max_msg,
        max_sge,
        max_chain,
    }
}

fn item(remote: u64, local: u64, len: u64) -> ReadItem {
    ReadItem { remote, local, len }
}

// ---------------------------------------------------------------------------------------------
// Endpoints and the connection token.

fn endpoint_v4() -> RdmaEndpoint {
    RdmaEndpoint {
        addr: "10.1.2.3:7471".parse().unwrap(),
        rkey: 0xdead_beef,
        base: 0x7f00_0000_0000,
        len: 1 << 30,
        token: [7; TOKEN_LEN],
    }
}

#[test]
fn endpoints_round_trip_in_both_families() {
    let v4 = endpoint_v4();
    let bytes = v4.encode();
    assert_eq!(bytes.len(), 48);
    assert_eq!(&bytes[..4], b"KVRD");
    assert_eq!(bytes[4], ENDPOINT_VERSION);
    assert_eq!(RdmaEndpoint::decode(&bytes), Ok(v4.clone()));

    let v6 = RdmaEndpoint {
        addr: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9000, 0, 0)),
        ..v4
    };
    let bytes = v6.encode();
    assert_eq!(bytes.len(), 60);
    assert_eq!(RdmaEndpoint::decode(&bytes), Ok(v6));
}

#[test]
fn endpoint_decoding_rejects_what_it_cannot_read() {
    let good = endpoint_v4().encode();
    assert_eq!(RdmaEndpoint::decode(&[]), Err(EndpointError::Empty));
    // A TCP endpoint handed to the RDMA transport.
    assert_eq!(
        RdmaEndpoint::decode(b"10.0.0.1:9000"),
        Err(EndpointError::BadMagic)
    );
    assert_eq!(RdmaEndpoint::decode(b"KV"), Err(EndpointError::BadMagic));
    let mut other = good.clone();
    other[4] = ENDPOINT_VERSION + 1;
    assert_eq!(
        RdmaEndpoint::decode(&other),
        Err(EndpointError::Version(ENDPOINT_VERSION + 1))
    );
    let mut other = good.clone();
    other[5] = 5;
    assert_eq!(RdmaEndpoint::decode(&other), Err(EndpointError::Family(5)));
    // Every truncation and an extra byte.
    for cut in 4..good.len() {
        let err = RdmaEndpoint::decode(&good[..cut]).unwrap_err();
        assert!(
            matches!(err, EndpointError::Length { actual, .. } if actual == cut),
            "cut at {cut}: {err:?}"
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        RdmaEndpoint::decode(&long),
        Err(EndpointError::Length {
            expected: 48,
            actual: 49
        })
    );
    // A v4 family byte on a v6-length body.
    let mut v6 = RdmaEndpoint {
        addr: "[::1]:1".parse().unwrap(),
        ..endpoint_v4()
    }
    .encode();
    v6[5] = 4;
    assert!(matches!(
        RdmaEndpoint::decode(&v6),
        Err(EndpointError::Length {
            expected: 48,
            actual: 60
        })
    ));
    let wraps = RdmaEndpoint {
        base: u64::MAX - 10,
        len: 11,
        ..endpoint_v4()
    };
    assert_eq!(
        RdmaEndpoint::decode(&wraps.encode()),
        Err(EndpointError::Region {
            base: u64::MAX - 10,
            len: 11
        })
    );
}

#[test]
fn endpoint_debug_output_leaves_out_the_capabilities() {
    let shown = format!("{:?}", endpoint_v4());
    assert!(shown.contains("10.1.2.3:7471"), "{shown}");
    assert!(!shown.contains("rkey") && !shown.contains("token"), "{shown}");
    assert!(!shown.contains(&0xdead_beef_u32.to_string()), "{shown}");
}

#[test]
fn registrations_are_told_apart() {
    let a = endpoint_v4();
    assert!(a.same_registration(&a.clone()));
    for b in [
        RdmaEndpoint { rkey: 1, ..a.clone() },
        RdmaEndpoint { base: 0, ..a.clone() },
        RdmaEndpoint { len: 1, ..a.clone() },
        RdmaEndpoint {
            token: [8; TOKEN_LEN],
            ..a.clone()
        },
        RdmaEndpoint {
            addr: "10.1.2.3:7472".parse().unwrap(),
            ..a.clone()
        },
    ] {
        assert!(!a.same_registration(&b), "{b:?}");
    }
}

#[test]
fn the_connection_token_is_checked() {
    let token = [3u8; TOKEN_LEN];
    let data = hello(&token);
    assert_eq!(data.len(), HELLO_LEN);
    assert!(hello_matches(&data, &token));
    // InfiniBand pads the private data with zeros.
    let mut padded = data.to_vec();
    padded.resize(56, 0);
    assert!(hello_matches(&padded, &token));
    assert!(!hello_matches(&data, &[4u8; TOKEN_LEN]));
    assert!(!hello_matches(&data[..HELLO_LEN - 1], &token));
    assert!(!hello_matches(&[], &token));
    let mut bad = data;
    bad[0] = b'X';
    assert!(!hello_matches(&bad, &token));
    let mut bad = data;
    bad[4] = 2;
    assert!(!hello_matches(&bad, &token));
    let mut bad = data;
    bad[HELLO_LEN - 1] ^= 1;
    assert!(!hello_matches(&bad, &token));
}

fn any_endpoint() -> impl Strategy<Value = RdmaEndpoint> {
    (
        any::<bool>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; TOKEN_LEN]>(),
    )
        .prop_map(|(v6, ip, port, rkey, base, len, token)| {
            let ip: IpAddr = if v6 {
                Ipv6Addr::from(ip).into()
            } else {
                Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into()
            };
            RdmaEndpoint {
                addr: SocketAddr::new(ip, port),
                rkey,
                base,
                len: len.min(u64::MAX - base),
                token,
            }
        })
}

proptest! {
    #[test]
    fn any_endpoint_round_trips(ep in any_endpoint()) {
        prop_assert_eq!(RdmaEndpoint::decode(&ep.encode()), Ok(ep));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(ep) = RdmaEndpoint::decode(&bytes) {
            prop_assert_eq!(ep.encode(), bytes);
        }
    }

    #[test]
    fn decoding_damaged_endpoints_never_panics(
        ep in any_endpoint(),
        at in 0usize..60,
        byte in any::<u8>(),
        cut in 0usize..61,
    ) {
        let mut bytes = ep.encode();
        let at = at % bytes.len();
        bytes[at] = byte;
        bytes.truncate(cut);
        if let Ok(back) = RdmaEndpoint::decode(&bytes) {
            prop_assert_eq!(back.encode(), bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Work request ids.

proptest! {
    #[test]
    fn wr_ids_round_trip(chain in any::<u32>(), pos in any::<u32>()) {
        prop_assert_eq!(split_wr_id(wr_id(chain, pos)), (chain, pos));
    }
}

#[test]
fn wr_ids_are_distinct_across_chains_and_positions() {
    assert_ne!(wr_id(0, 1), wr_id(1, 0));
    assert_eq!(wr_id(1, 2), (1 << 32) | 2);
}

// ---------------------------------------------------------------------------------------------
// Planning.

/// The `(remote, local, len)` pieces a plan reads, with the chain of each.
fn pieces(plan: &ReadPlan) -> Vec<(u64, u64, u64, usize)> {
    let mut out = Vec::new();
    for (c, chain) in plan.chains.iter().enumerate() {
        for wr in &chain.wrs {
            let mut remote = wr.remote;
            for sge in &wr.sges {
                out.push((remote, sge.addr, u64::from(sge.len), c));
                remote += u64::from(sge.len);
            }
        }
    }
    out
}

/// Checks every rule a plan must keep; returns the chains carrying each item.
fn check_plan(items: &[ReadItem], lim: ReadLimits, plan: &ReadPlan) -> Vec<BTreeSet<usize>> {
    let max_msg = lim.max_msg.clamp(1, u64::from(u32::MAX));
    assert_eq!(plan.items, items.len());
    for (c, chain) in plan.chains.iter().enumerate() {
        assert!(!chain.wrs.is_empty(), "chain {c} is empty");
        assert!(chain.wrs.len() <= lim.max_chain.max(1), "chain {c} too long");
        for (p, wr) in chain.wrs.iter().enumerate() {
            assert_eq!(wr.wr_id, wr_id(c as u32, p as u32));
            assert_eq!(split_wr_id(wr.wr_id), (c as u32, p as u32));
            assert_eq!(
                wr.signaled,
                p + 1 == chain.wrs.len(),
                "only the last WR is signalled"
            );
            assert!(!wr.sges.is_empty() && wr.sges.len() <= lim.max_sge.max(1));
            assert!(wr.sges.iter().all(|s| s.len > 0));
            assert!(wr.len() <= max_msg, "WR of {} bytes over {max_msg}", wr.len());
        }
    }
    // Every byte of every item read exactly once, remote offset = local offset.
    let mut carried = vec![BTreeSet::new(); items.len()];
    let mut per_item: Vec<Vec<(u64, u64)>> = vec![Vec::new(); items.len()];
    let mut total = 0;
    for (mut remote, mut local, mut len, c) in pieces(plan) {
        // An SGE may run over several items adjacent on both sides: cut it at their bounds.
        while len > 0 {
            let i = items
                .iter()
                .position(|it| it.len > 0 && local >= it.local && local < it.local + it.len)
                .unwrap_or_else(|| panic!("byte {local:#x} is in no item"));
            let it = items[i];
            let part = len.min(it.local + it.len - local);
            assert_eq!(
                remote - it.remote,
                local - it.local,
                "piece misplaced in item {i}"
            );
            per_item[i].push((local - it.local, part));
            carried[i].insert(c);
            total += part;
            (remote, local, len) = (remote + part, local + part, len - part);
        }
    }
    assert_eq!(total, items.iter().map(|i| i.len).sum::<u64>());
    for (i, mut ranges) in per_item.into_iter().enumerate() {
        ranges.sort_unstable();
        let mut at = 0;
        for (off, len) in ranges {
            assert_eq!(off, at, "item {i}: gap or overlap at {at}");
            at += len;
        }
        assert_eq!(at, items[i].len, "item {i} not covered");
    }
    for (c, chain) in plan.chains.iter().enumerate() {
        let expected: Vec<u32> = (0..items.len())
            .filter(|&i| carried[i].contains(&c))
            .map(|i| i as u32)
            .collect();
        assert_eq!(chain.items, expected, "chain {c}'s items");
    }
    carried
}

/// Items laid out in a remote and a local space: disjoint in each, each item either right after
/// the previous one or after a gap, so that plans both merge and split.
fn any_items() -> impl Strategy<Value = Vec<ReadItem>> {
    proptest::collection::vec((0u64..40, any::<bool>(), 0u64..5, any::<bool>(), 0u64..5), 0..24).prop_map(
        |specs| {
            let (mut remote, mut local) = (4096u64, 16u64);
            specs
                .into_iter()
                .map(|(len, remote_gap, rgap, local_gap, lgap)| {
                    remote += if remote_gap { rgap + 1 } else { 0 };
                    local += if local_gap { lgap + 1 } else { 0 };
                    let it = item(remote, local, len);
                    remote += len;
                    local += len;
                    it
                })
                .collect()
        },
    )
}

fn any_limits() -> impl Strategy<Value = ReadLimits> {
    (0u64..50, 0usize..5, 0usize..6).prop_map(|(m, s, c)| limits(m, s, c))
}

proptest! {
    #[test]
    fn plans_cover_every_byte_once_within_the_limits(items in any_items(), lim in any_limits()) {
        let plan = plan_reads(&items, lim).unwrap();
        let carried = check_plan(&items, lim, &plan);
        for (i, it) in items.iter().enumerate() {
            prop_assert_eq!(carried[i].is_empty(), it.len == 0);
        }
    }

    #[test]
    fn plans_use_as_few_reads_as_the_limits_allow_for_one_run(
        n in 1usize..20, len in 1u64..30, max_msg in 1u64..200,
    ) {
        // Blocks back to back on both sides: one run, split only by the message size.
        let items: Vec<_> = (0..n as u64).map(|i| item(i * len, 1000 + i * len, len)).collect();
        let plan = plan_reads(&items, limits(max_msg, 1, 64)).unwrap();
        check_plan(&items, limits(max_msg, 1, 64), &plan);
        let wrs: usize = plan.chains.iter().map(|c| c.wrs.len()).sum();
        prop_assert_eq!(wrs as u64, (n as u64 * len).div_ceil(max_msg));
    }
}

#[test]
fn adjacent_blocks_share_a_read() {
    // Adjacent on both sides: one READ, one SGE.
    let both = [item(0, 100, 10), item(10, 110, 10), item(20, 120, 10)];
    let plan = plan_reads(&both, limits(1 << 20, 4, 8)).unwrap();
    assert_eq!(plan.chains.len(), 1);
    assert_eq!(plan.chains[0].wrs.len(), 1);
    assert_eq!(plan.chains[0].wrs[0].sges.len(), 1);
    assert_eq!(plan.chains[0].wrs[0].sges[0].len, 30);
    assert_eq!(plan.chains[0].items, [0, 1, 2]);

    // Adjacent at the source only: one READ scattering into three slots.
    let remote_only = [item(0, 100, 10), item(10, 300, 10), item(20, 200, 10)];
    let plan = plan_reads(&remote_only, limits(1 << 20, 4, 8)).unwrap();
    assert_eq!(plan.chains[0].wrs.len(), 1);
    let addrs: Vec<u64> = plan.chains[0].wrs[0].sges.iter().map(|s| s.addr).collect();
    assert_eq!(addrs, [100, 300, 200]);
    // ...or two READs when a READ takes two SGEs.
    let plan = plan_reads(&remote_only, limits(1 << 20, 2, 8)).unwrap();
    assert_eq!(plan.chains[0].wrs.len(), 2);
    check_plan(&remote_only, limits(1 << 20, 2, 8), &plan);

    // Not adjacent at the source: a READ each.
    let apart = [item(0, 100, 10), item(11, 110, 10)];
    let plan = plan_reads(&apart, limits(1 << 20, 4, 8)).unwrap();
    assert_eq!(plan.chains[0].wrs.len(), 2);
}

#[test]
fn large_blocks_are_split_and_chains_are_cut() {
    let plan = plan_reads(&[item(0, 1000, 10)], limits(4, 1, 2)).unwrap();
    let lens: Vec<Vec<u64>> = plan
        .chains
        .iter()
        .map(|c| c.wrs.iter().map(ReadWr::len).collect())
        .collect();
    assert_eq!(lens, [vec![4, 4], vec![2]]);
    assert!(plan.chains.iter().all(|c| c.items == [0]));
    assert_eq!(plan.chains[1].wrs[0].remote, 8);
    assert_eq!(plan.chains[1].wrs[0].sges[0].addr, 1008);
}

#[test]
fn a_message_never_outgrows_an_sge() {
    // 5 GiB, on a port claiming no limit: SGE lengths are 32 bits.
    let big = 5u64 << 30;
    let items = [item(0, 1 << 40, big)];
    let plan = plan_reads(&items, limits(u64::MAX, 4, 16)).unwrap();
    check_plan(&items, limits(u64::MAX, 4, 16), &plan);
    assert_eq!(plan.chains[0].wrs.len(), 2);
}

#[test]
fn zero_length_items_need_no_read() {
    let items = [item(0, 0, 0), item(0, 100, 8), item(8, 200, 0)];
    let plan = plan_reads(&items, limits(64, 2, 2)).unwrap();
    assert_eq!(plan.chains.len(), 1);
    assert_eq!(plan.chains[0].items, [1]);
    let tracker = ReadTracker::new(&plan);
    assert_eq!(tracker.outcomes()[0], ItemOutcome::Done);
    assert_eq!(tracker.outcomes()[2], ItemOutcome::Done);
    assert_eq!(plan_reads(&[], limits(64, 2, 2)).unwrap().chains.len(), 0);
}

#[test]
fn ranges_that_wrap_are_refused() {
    let err = plan_reads(&[item(0, 0, 4), item(u64::MAX - 1, 0, 5)], limits(64, 1, 1)).unwrap_err();
    assert_eq!(err, wr::PlanError::Overflow { item: 1 });
    let err = plan_reads(&[item(0, u64::MAX, 2)], limits(64, 1, 1)).unwrap_err();
    assert_eq!(err, wr::PlanError::Overflow { item: 0 });
}

// ---------------------------------------------------------------------------------------------
// Completion bookkeeping.

/// Three chains of two WRs over items 0..3; item 1 spans chains 0 and 1.
fn three_chains() -> ReadPlan {
    let items = [item(0, 0, 6), item(100, 100, 6), item(200, 200, 4)];
    let plan = plan_reads(&items, limits(4, 1, 2)).unwrap();
    // item 0: 4+2, item 1: 4+2, item 2: 4 → WRs [0a 0b] [1a 1b] [2]
    assert_eq!(plan.chains.len(), 3);
    assert_eq!(plan.chains[0].items, [0]);
    assert_eq!(plan.chains[1].items, [1]);
    assert_eq!(plan.chains[2].items, [2]);
    plan
}

fn post_all(t: &mut ReadTracker, window: usize) {
    while let Some(c) = t.next_to_post(window) {
        t.posted(c);
    }
}

#[test]
fn a_chain_is_done_when_its_signalled_wr_completes() {
    let plan = three_chains();
    let mut t = ReadTracker::new(&plan);
    post_all(&mut t, 16);
    assert_eq!(t.in_flight(), 5);
    // An unsignalled success changes nothing.
    t.complete(wr_id(0, 0), WC_SUCCESS).unwrap();
    assert_eq!(t.outcomes()[0], ItemOutcome::Unfinished);
    t.complete(wr_id(0, 1), WC_SUCCESS).unwrap();
    assert_eq!(t.outcomes()[0], ItemOutcome::Done);
    assert_eq!(t.in_flight(), 3);
    t.complete(wr_id(1, 1), WC_SUCCESS).unwrap();
    t.complete(wr_id(2, 0), WC_SUCCESS).unwrap();
    assert!(t.is_finished());
    assert!(t.outcomes().iter().all(|o| *o == ItemOutcome::Done));
}

#[test]
fn a_failed_completion_fails_exactly_its_chains_items() {
    let plan = three_chains();
    for failing in 0..3 {
        for pos in 0..plan.chains[failing].wrs.len() as u32 {
            let mut t = ReadTracker::new(&plan);
            post_all(&mut t, 16);
            for c in 0..3 {
                let last = plan.chains[c].wrs.len() as u32 - 1;
                if c == failing {
                    t.complete(wr_id(c as u32, pos), WC_REM_ACCESS_ERR).unwrap();
                    if pos != last {
                        t.complete(wr_id(c as u32, last), WC_FLUSHED).unwrap();
                    }
                } else {
                    t.complete(wr_id(c as u32, last), WC_SUCCESS).unwrap();
                }
            }
            assert_eq!(t.in_flight(), 0);
            for (i, o) in t.outcomes().into_iter().enumerate() {
                let expected = if plan.chains[failing].items.contains(&(i as u32)) {
                    ItemOutcome::Failed {
                        status: WC_REM_ACCESS_ERR,
                    }
                } else {
                    ItemOutcome::Done
                };
                assert_eq!(o, expected, "chain {failing} failing at {pos}, item {i}");
            }
        }
    }
}

#[test]
fn an_item_split_over_chains_fails_with_either() {
    // One item over three chains of one WR each.
    let plan = plan_reads(&[item(0, 0, 12)], limits(4, 1, 1)).unwrap();
    assert_eq!(plan.chains.len(), 3);
    let mut t = ReadTracker::new(&plan);
    post_all(&mut t, 16);
    t.complete(wr_id(0, 0), WC_SUCCESS).unwrap();
    t.complete(wr_id(1, 0), WC_SUCCESS).unwrap();
    assert_eq!(t.outcomes()[0], ItemOutcome::Unfinished);
    t.complete(wr_id(2, 0), WC_RETRY_EXC_ERR).unwrap();
    assert_eq!(
        t.outcomes()[0],
        ItemOutcome::Failed {
            status: WC_RETRY_EXC_ERR
        }
    );
}

#[test]
fn completions_that_do_not_belong_are_refused() {
    let plan = three_chains();
    let mut t = ReadTracker::new(&plan);
    assert_eq!(
        t.complete(wr_id(0, 1), WC_SUCCESS),
        Err(TrackError::NotPosted(wr_id(0, 1)))
    );
    post_all(&mut t, 2);
    assert_eq!(
        t.complete(wr_id(9, 0), WC_SUCCESS),
        Err(TrackError::Unknown(wr_id(9, 0)))
    );
    assert_eq!(
        t.complete(wr_id(0, 2), WC_SUCCESS),
        Err(TrackError::Unknown(wr_id(0, 2)))
    );
    t.complete(wr_id(0, 1), WC_SUCCESS).unwrap();
    assert_eq!(
        t.complete(wr_id(0, 1), WC_SUCCESS),
        Err(TrackError::Duplicate(wr_id(0, 1)))
    );
}

#[test]
fn the_window_bounds_reads_in_flight() {
    let plan = three_chains();
    let mut t = ReadTracker::new(&plan);
    // Two WRs per chain in a window of 3: one chain at a time.
    assert_eq!(t.next_to_post(3), Some(0));
    t.posted(0);
    assert_eq!(t.next_to_post(3), None);
    t.complete(wr_id(0, 1), WC_SUCCESS).unwrap();
    assert_eq!(t.next_to_post(3), Some(1));
    t.posted(1);
    // Posting out of order is ignored.
    t.posted(0);
    assert_eq!(t.in_flight(), 2);
    // A chain longer than the window still goes when nothing is in flight.
    let mut t = ReadTracker::new(&plan);
    assert_eq!(t.next_to_post(1), Some(0));
    t.posted(0);
    assert_eq!(t.next_to_post(1), None);
    // Nothing is posted after a failure.
    t.complete(wr_id(0, 1), WC_REM_ACCESS_ERR).unwrap();
    assert_eq!(t.next_to_post(16), None);
}

// ---------------------------------------------------------------------------------------------
// The pump, against a simulated queue pair that really moves bytes.

/// A reliable-connected send queue in miniature: READs execute in order, a signalled one
/// completes, an error moves the queue pair to the error state and flushes everything behind
/// it (unsignalled READs too, as the verbs specification has it).
struct FakeQp {
    window: usize,
    rkey: u32,
    remote: Vec<u8>,
    local: Vec<u8>,
    /// Local addresses are offsets into `local` plus this.
    local_base: u64,
    queue: VecDeque<ReadWr>,
    cqes: VecDeque<(u64, u32)>,
    /// READs executed per poll.
    per_poll: usize,
    /// The READ (counted from 0 over the pull) that fails, and how.
    fail_at: Option<(usize, u32)>,
    /// Executes nothing (a peer that stopped answering).
    stalled: bool,
    /// Whether moving to the error state flushes what is queued (a device that never does is
    /// what the drain bound and destroying the queue pair are for).
    flushes: bool,
    /// The `ibv_post_send` call (counted from 0) that fails after posting this many WRs.
    post_fails: Option<(usize, usize)>,
    posts: usize,
    executed: usize,
    error: bool,
    most_queued: usize,
    posted_chains: BTreeSet<u32>,
}

impl FakeQp {
    fn new(window: usize, remote: Vec<u8>, local_len: usize, local_base: u64) -> Self {
        Self {
            window,
            rkey: 42,
            remote,
            local: vec![0; local_len],
            local_base,
            queue: VecDeque::new(),
            cqes: VecDeque::new(),
            per_poll: 3,
            fail_at: None,
            stalled: false,
            flushes: true,
            post_fails: None,
            posts: 0,
            executed: 0,
            error: false,
            most_queued: 0,
            posted_chains: BTreeSet::new(),
        }
    }

    fn flush(&mut self) {
        while let Some(wr) = self.queue.pop_front() {
            self.cqes.push_back((wr.wr_id, WC_FLUSHED));
        }
    }

    fn execute(&mut self, wr: &ReadWr) {
        let mut at = wr.remote as usize;
        for sge in &wr.sges {
            let dst = (sge.addr - self.local_base) as usize;
            let len = sge.len as usize;
            self.local[dst..dst + len].copy_from_slice(&self.remote[at..at + len]);
            at += len;
        }
    }
}

impl ReadQueue for FakeQp {
    fn window(&self) -> usize {
        self.window
    }

    fn post(&mut self, wrs: &[ReadWr], rkey: u32) -> Result<(), PostError> {
        assert_eq!(rkey, self.rkey);
        let call = self.posts;
        self.posts += 1;
        let take = match self.post_fails {
            Some((c, n)) if c == call => n.min(wrs.len()),
            _ => wrs.len(),
        };
        for wr in &wrs[..take] {
            self.posted_chains.insert(split_wr_id(wr.wr_id).0);
            self.queue.push_back(wr.clone());
        }
        self.most_queued = self.most_queued.max(self.queue.len());
        if self.error {
            self.flush();
        }
        if take < wrs.len() {
            return Err(PostError {
                error: std::io::Error::from_raw_os_error(libc::ENOMEM),
                posted: take,
            });
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> std::io::Result<usize> {
        if !self.stalled && !self.error {
            for _ in 0..self.per_poll {
                let Some(wr) = self.queue.pop_front() else { break };
                match self.fail_at {
                    Some((n, status)) if n == self.executed => {
                        self.cqes.push_back((wr.wr_id, status));
                        self.error = true;
                        self.flush();
                        break;
                    }
                    _ => {
                        self.execute(&wr);
                        if wr.signaled {
                            self.cqes.push_back((wr.wr_id, WC_SUCCESS));
                        }
                    }
                }
                self.executed += 1;
            }
        }
        let n = self.cqes.len().min(16);
        out.extend(self.cqes.drain(..n));
        Ok(n)
    }

    fn to_error(&mut self) -> std::io::Result<()> {
        self.error = true;
        if self.flushes {
            self.flush();
        }
        Ok(())
    }
}

const LOCAL_BASE: u64 = 1 << 32;

/// A pull of `items` (remote offsets into `remote`, local offsets from 0) through `qp`.
fn pump_pull(
    qp: &mut FakeQp,
    items: &[ReadItem],
    lim: ReadLimits,
    deadline: Instant,
    drain: Duration,
) -> (ReadPlan, Option<TransportError>, Vec<ItemOutcome>, usize) {
    let items: Vec<ReadItem> = items
        .iter()
        .map(|i| item(i.remote, i.local + LOCAL_BASE, i.len))
        .collect();
    let plan = plan_reads(&items, lim).unwrap();
    let mut tracker = ReadTracker::new(&plan);
    let rkey = qp.rkey;
    let stopped = pump::run(qp, &plan, &mut tracker, rkey, deadline, "peer", describe);
    let left = if stopped.is_some() {
        pump::fence(qp, &mut tracker, drain)
    } else {
        0
    };
    (plan, stopped, tracker.outcomes(), left)
}

fn remote_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pulls_through_a_queue_pair_move_every_byte(
        items in any_items(),
        lim in any_limits(),
        window in 1usize..8,
        per_poll in 1usize..5,
    ) {
        let mut qp = FakeQp::new(window, remote_bytes(8192), 4096, LOCAL_BASE);
        qp.per_poll = per_poll;
        let lim = ReadLimits { max_chain: lim.max_chain.clamp(1, window), ..lim };
        let (_, stopped, outcomes, _) = pump_pull(&mut qp, &items, lim, soon(), Duration::ZERO);
        prop_assert!(stopped.is_none(), "{:?}", stopped);
        prop_assert!(qp.most_queued <= window, "{} queued in a window of {}", qp.most_queued, window);
        for (i, it) in items.iter().enumerate() {
            prop_assert_eq!(outcomes[i], ItemOutcome::Done);
            let (l, r) = (it.local as usize, it.remote as usize);
            let len = it.len as usize;
            prop_assert_eq!(&qp.local[l..l + len], &qp.remote[r..r + len], "item {}", i);
        }
    }

    #[test]
    fn a_failed_read_fails_its_chain_and_flushes_the_rest(
        items in any_items(),
        lim in any_limits(),
        window in 1usize..8,
        per_poll in 1usize..5,
        fail in any::<prop::sample::Index>(),
    ) {
        let probe = plan_reads(&items, lim).unwrap();
        let wrs: usize = probe.chains.iter().map(|c| c.wrs.len()).sum();
        prop_assume!(wrs > 0);
        let fail_at = fail.index(wrs);
        let mut qp = FakeQp::new(window, remote_bytes(8192), 4096, LOCAL_BASE);
        qp.per_poll = per_poll;
        qp.fail_at = Some((fail_at, WC_REM_ACCESS_ERR));
        let (plan, stopped, outcomes, left) = pump_pull(&mut qp, &items, lim, soon(), Duration::from_secs(5));
        prop_assert!(matches!(&stopped, Some(TransportError::Io { reason, .. }) if reason.contains("RDMA READ failed")), "{:?}", stopped);
        prop_assert_eq!(left, 0, "the drain settles every posted chain");
        // The chain of the failing READ, counting READs in posting order.
        let mut n = 0;
        let mut failing = 0;
        for (c, chain) in plan.chains.iter().enumerate() {
            if fail_at < n + chain.wrs.len() {
                failing = c;
                break;
            }
            n += chain.wrs.len();
        }
        for (i, it) in items.iter().enumerate() {
            let chains: Vec<usize> = (0..plan.chains.len())
                .filter(|&c| plan.chains[c].items.contains(&(i as u32)))
                .collect();
            let expected = if chains.contains(&failing) {
                ItemOutcome::Failed { status: WC_REM_ACCESS_ERR }
            } else if chains.iter().all(|&c| c < failing) {
                ItemOutcome::Done
            } else if chains.iter().any(|&c| c > failing && qp.posted_chains.contains(&(c as u32))) {
                ItemOutcome::Failed { status: WC_FLUSHED }
            } else {
                ItemOutcome::Unfinished
            };
            prop_assert_eq!(outcomes[i], expected, "item {} over chains {:?}, chain {} failed", i, chains, failing);
            if expected == ItemOutcome::Done {
                let (l, r, len) = (it.local as usize, it.remote as usize, it.len as usize);
                prop_assert_eq!(&qp.local[l..l + len], &qp.remote[r..r + len]);
            }
        }
        // What the caller reports: the failing READ's status for its chain, the first error
        // for everything flushed or never posted.
        let stopped = stopped.unwrap();
        for (o, f) in outcomes.iter().zip(pump::fates(outcomes.clone(), Some(&stopped), "peer", describe)) {
            match o {
                ItemOutcome::Done => prop_assert_eq!(f, pump::Fate::Arrived),
                ItemOutcome::Failed { status } if *status == WC_REM_ACCESS_ERR => prop_assert!(
                    matches!(&f, pump::Fate::Failed(TransportError::Io { reason, .. }) if reason.contains("status 10")),
                    "{:?}", f
                ),
                _ => prop_assert_eq!(f, pump::Fate::Failed(stopped.clone())),
            }
        }
    }
}

#[test]
fn a_peer_that_stops_answering_times_out_and_is_drained() {
    let items = [item(0, 0, 64), item(64, 128, 64)];
    let mut qp = FakeQp::new(4, remote_bytes(256), 256, LOCAL_BASE);
    qp.stalled = true;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(30);
    let (_, stopped, outcomes, left) = pump_pull(
        &mut qp,
        &items,
        limits(32, 1, 2),
        deadline,
        Duration::from_secs(5),
    );
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up long after the deadline"
    );
    assert_eq!(stopped, Some(TransportError::TimedOut { peer: "peer".into() }));
    assert_eq!(left, 0);
    assert!(qp.queue.is_empty(), "flushed by the error state");
    let fates = pump::fates(outcomes, stopped.as_ref(), "peer", describe);
    assert!(
        fates
            .iter()
            .all(|f| *f == pump::Fate::Failed(TransportError::TimedOut { peer: "peer".into() })),
        "{fates:?}"
    );
}

/// A pull whose deadline has passed posts nothing more, even while every poll brings
/// completions: what was posted completes, and the rest fails as late.
#[test]
fn nothing_is_posted_past_the_deadline() {
    let items: Vec<ReadItem> = (0..4).map(|i| item(i * 64, i * 64, 64)).collect();
    let mut qp = FakeQp::new(1, remote_bytes(256), 256, LOCAL_BASE);
    let (_, stopped, outcomes, _) = pump_pull(
        &mut qp,
        &items,
        limits(32, 1, 1),
        Instant::now(),
        Duration::from_millis(30),
    );
    assert_eq!(stopped, Some(TransportError::TimedOut { peer: "peer".into() }));
    assert_eq!(qp.posts, 0, "posted past the deadline");
    assert!(outcomes.iter().all(|o| *o != ItemOutcome::Done), "{outcomes:?}");
}

#[test]
fn a_drain_that_never_ends_is_bounded() {
    let items = [item(0, 0, 64)];
    let mut qp = FakeQp::new(4, remote_bytes(256), 256, LOCAL_BASE);
    qp.stalled = true;
    qp.flushes = false;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(10);
    let (_, stopped, outcomes, left) = pump_pull(
        &mut qp,
        &items,
        limits(32, 1, 2),
        deadline,
        Duration::from_millis(30),
    );
    assert!(matches!(stopped, Some(TransportError::TimedOut { .. })));
    assert!(started.elapsed() >= Duration::from_millis(40));
    assert_eq!(
        left, 2,
        "both READs still in flight: the caller destroys the queue pair"
    );
    assert_eq!(outcomes, [ItemOutcome::Unfinished]);
}

#[test]
fn a_failed_post_stops_the_pull() {
    let items = [item(0, 0, 64), item(100, 100, 64)];
    let mut qp = FakeQp::new(8, remote_bytes(256), 256, LOCAL_BASE);
    // The second chain's post fails after one of its two WRs.
    qp.post_fails = Some((1, 1));
    let (_, stopped, outcomes, left) =
        pump_pull(&mut qp, &items, limits(32, 1, 2), soon(), Duration::from_secs(5));
    assert!(
        matches!(&stopped, Some(TransportError::Io { reason, .. }) if reason.contains("ibv_post_send") && reason.contains("1 of the chain's 2")),
        "{stopped:?}"
    );
    assert_eq!(left, 0);
    // The first chain was posted whole and either completed or was flushed; the second never
    // counted as posted.
    assert_eq!(outcomes[1], ItemOutcome::Unfinished);
    assert_ne!(outcomes[0], ItemOutcome::Unfinished);
}

#[test]
fn fates_name_the_cause() {
    let timed_out = TransportError::TimedOut { peer: "p".into() };
    let got = pump::fates(
        vec![
            ItemOutcome::Done,
            ItemOutcome::Failed { status: WC_FLUSHED },
            ItemOutcome::Failed {
                status: WC_REM_ACCESS_ERR,
            },
            ItemOutcome::Unfinished,
        ],
        Some(&timed_out),
        "p",
        describe,
    );
    assert_eq!(got[0], pump::Fate::Arrived);
    assert_eq!(got[1], pump::Fate::Failed(timed_out.clone()));
    assert_eq!(
        got[2],
        pump::Fate::Failed(TransportError::Io {
            peer: "p".into(),
            reason: "RDMA READ failed: status 10".into()
        })
    );
    assert_eq!(got[3], pump::Fate::Failed(timed_out));
}

#[test]
fn work_completion_statuses_are_named() {
    assert_eq!(conn::wc_status_text(WC_SUCCESS), "success");
    let text = conn::wc_status_text(WC_REM_ACCESS_ERR);
    assert!(
        text.contains("remote access error") && text.contains("restarted"),
        "{text}"
    );
    assert!(conn::wc_status_text(WC_FLUSHED).to_lowercase().contains("flush"));
}

#[test]
fn endpoints_in_errors_hide_binary_capabilities() {
    assert_eq!(shown(b"10.0.0.1:9000"), "10.0.0.1:9000");
    assert_eq!(shown(&endpoint_v4().encode()), "<48 bytes>");
    assert_eq!(shown(b""), "<0 bytes>");
}

// ---------------------------------------------------------------------------------------------
// Devices.

#[test]
fn device_lists_map_to_clear_errors() {
    let reason = |r: Result<String, TransportError>| match r {
        Err(TransportError::Unavailable {
            transport: TransportKind::Rdma,
            reason,
        }) => reason,
        other => panic!("expected Unavailable, got {other:?}"),
    };
    assert_eq!(
        reason(pick_device(Ok(vec![]), None)),
        "no RDMA device (ibv_get_device_list found none)"
    );
    let r = reason(pick_device(Err(libc::ENOSYS), None));
    assert!(
        r.starts_with("no RDMA device (no RDMA support in this kernel; ibv_get_device_list failed: "),
        "{r}"
    );
    assert!(r.contains("not implemented"), "{r}");
    let r = reason(pick_device(Err(libc::EACCES), None));
    assert!(
        r.starts_with("no RDMA device (ibv_get_device_list failed: "),
        "{r}"
    );
    assert!(reason(pick_device(Err(0), Some("mlx5_0"))).starts_with("no RDMA device"));
    let names = || Ok(vec!["mlx5_0".to_string(), "mlx5_1".to_string()]);
    assert_eq!(pick_device(names(), None).unwrap(), "mlx5_0");
    assert_eq!(pick_device(names(), Some("mlx5_1")).unwrap(), "mlx5_1");
    let r = reason(pick_device(names(), Some("rxe0")));
    assert_eq!(r, "RDMA device \"rxe0\" not found; this host has mlx5_0, mlx5_1");
}

/// On a host without RDMA devices (this project's build machines and CI), construction says so
/// cleanly; on one with a device it must not claim there is none. Both roles, and a named
/// device, are tried.
#[test]
fn construction_reports_a_missing_device_cleanly() {
    let listed = list_devices();
    let s = store(8);
    let grants = Arc::new(Grants::new(Arc::clone(&s), Duration::from_secs(5), 4));
    let attempts = [
        RdmaTransport::new(Arc::clone(&s), None, RdmaConfig::default()),
        RdmaTransport::new(Arc::clone(&s), Some(grants), RdmaConfig::default()),
        RdmaTransport::new(
            Arc::clone(&s),
            None,
            RdmaConfig {
                device: Some("mlx5_0".into()),
                ..RdmaConfig::default()
            },
        ),
    ];
    match &listed {
        Ok(names) if !names.is_empty() => {
            eprintln!("this host has RDMA devices {names:?}: checking they are not reported missing");
            for r in attempts {
                if let Err(e) = r {
                    assert!(!e.to_string().contains("no RDMA device"), "{e}");
                }
            }
        }
        _ => {
            eprintln!("this host has no RDMA device ({listed:?}): checking the error");
            for r in attempts {
                let err = r.expect_err("no device, no transport");
                let TransportError::Unavailable {
                    transport: TransportKind::Rdma,
                    reason,
                } = &err
                else {
                    panic!("expected Unavailable, got {err:?}");
                };
                assert!(reason.starts_with("no RDMA device"), "{reason}");
                assert!(
                    err.to_string()
                        .starts_with("rdma transport unavailable: no RDMA device"),
                    "{err}"
                );
            }
        }
    }
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let cfg = RdmaConfig::default();
    assert_eq!(cfg.max_outstanding_reads, 16);
    assert_eq!(cfg.port, 1);
    assert!(cfg.listen.ip().is_unspecified() && cfg.listen.port() == 0);
    assert!(cfg.wrs_per_post <= cfg.max_outstanding_reads);
}

// ---------------------------------------------------------------------------------------------
// On a real device (run with `--ignored` on a host that has one).

/// An IPv4 address of an interface on an RDMA device: `KVTIER_RDMA_TEST_IP`, or the first one
/// found on the network devices behind `/sys/class/infiniband/*` (a NIC's own, or the ones a
/// port's GIDs name, as for soft RoCE).
fn rdma_test_ip() -> Option<IpAddr> {
    if let Ok(ip) = std::env::var("KVTIER_RDMA_TEST_IP") {
        return ip.parse().ok();
    }
    let mut netdevs = Vec::new();
    for dev in std::fs::read_dir("/sys/class/infiniband").ok()?.flatten() {
        if let Ok(nets) = std::fs::read_dir(dev.path().join("device/net")) {
            netdevs.extend(
                nets.flatten()
                    .map(|n| n.file_name().to_string_lossy().into_owned()),
            );
        }
        for port in std::fs::read_dir(dev.path().join("ports"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let ndevs = std::fs::read_dir(port.path().join("gid_attrs/ndevs"));
            for ndev in ndevs.into_iter().flatten().flatten() {
                if let Ok(name) = std::fs::read_to_string(ndev.path()) {
                    netdevs.push(name.trim().to_string());
                }
            }
        }
    }
    let mut found = None;
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the list is freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut at = addrs;
    while !at.is_null() && found.is_none() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let a = unsafe { &*at };
        if !a.ifa_addr.is_null() && !a.ifa_name.is_null() {
            // SAFETY: a NUL-terminated name inside the list.
            let name = unsafe { std::ffi::CStr::from_ptr(a.ifa_name) }.to_string_lossy();
            // SAFETY: a non-null address of the list.
            let family = i32::from(unsafe { (*a.ifa_addr).sa_family });
            if family == libc::AF_INET && netdevs.iter().any(|n| *n == name) {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*a.ifa_addr.cast::<libc::sockaddr_in>() };
                found = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            }
        }
        at = a.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(addrs) };
    found
}

/// Reserves slots in `dst` for the grant's blocks (`checksums` overrides theirs) and pulls.
async fn pull_grant(
    dst: &TieredStore,
    t: &RdmaTransport,
    endpoint: &[u8],
    grant: &crate::transport::Grant,
    keys: &[crate::BlockKey],
    tamper: Option<usize>,
) -> Vec<Pulled> {
    let items = grant
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let crate::host::Reserve::Slot(slot) = dst.host().reserve(keys[i], b.len) else {
                panic!("no slot for block {i}");
            };
            PullItem {
                index: i as u32,
                remote_offset: b.offset,
                checksum: if tamper == Some(i) {
                    !b.checksum
                } else {
                    b.checksum
                },
                slot,
            }
        })
        .collect();
    t.pull(endpoint, grant.id, items, soon()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device with an IPv4 address (set KVTIER_RDMA_TEST_IP to choose one)"]
async fn pulls_over_a_real_device() {
    let ip = rdma_test_ip().expect("no IPv4 address on an RDMA device");
    let (src, dst) = (store(64), store(64));
    let lens = [4096usize, 1 << 20, 5000, 1, 3 << 20, 96 * 1024 + 3];
    let keys: Vec<_> = (0..lens.len() as u64).map(key).collect();
    for (i, &len) in lens.iter().enumerate() {
        assert_eq!(
            src.put(&keys[i], &payload(i as u64, len)),
            crate::PutOutcome::Stored
        );
    }
    let grants = Arc::new(Grants::new(Arc::clone(&src), Duration::from_secs(30), 16));
    let cfg = RdmaConfig {
        listen: SocketAddr::new(ip, 0),
        max_sge: 2,
        wrs_per_post: 2,
        max_outstanding_reads: 4,
        ..RdmaConfig::default()
    };
    let source = RdmaTransport::new(Arc::clone(&src), Some(Arc::clone(&grants)), cfg.clone()).unwrap();
    let puller = RdmaTransport::new(Arc::clone(&dst), None, cfg).unwrap();
    let endpoint = source.endpoint(None);
    assert_eq!(RdmaEndpoint::decode(&endpoint).unwrap().addr.ip(), ip);

    // Twice: the second pull reuses the queue pair.
    for round in 0..2 {
        let grant = grants.grant(&keys).unwrap();
        let pulled = pull_grant(&dst, &puller, &endpoint, &grant, &keys, None).await;
        assert_eq!(pulled.len(), lens.len());
        for p in pulled {
            assert_eq!(p.result, Ok(()), "round {round} block {}", p.index);
            let mut slot = p.slot;
            let got = dst.host().reserved_mut(&mut slot).to_vec();
            assert_eq!(got, payload(u64::from(p.index), lens[p.index as usize]));
            dst.host().abort(slot);
        }
        grants.release(&grant.id);
    }

    // A wrong checksum fails that block only.
    let grant = grants.grant(&keys).unwrap();
    let pulled = pull_grant(&dst, &puller, &endpoint, &grant, &keys, Some(2)).await;
    for p in pulled {
        if p.index == 2 {
            assert!(matches!(p.result, Err(TransportError::Checksum { index: 2, .. })));
        } else {
            assert_eq!(p.result, Ok(()));
        }
        dst.host().abort(p.slot);
    }

    // A wrong remote key: the READs fail at the source's device, and the pull says so.
    let mut bad = RdmaEndpoint::decode(&endpoint).unwrap();
    bad.rkey ^= 0x5a5a_5a5a;
    let pulled = pull_grant(&dst, &puller, &bad.encode(), &grant, &keys, None).await;
    for p in pulled {
        assert!(
            matches!(p.result, Err(TransportError::Io { .. })),
            "{:?}",
            p.result
        );
        dst.host().abort(p.slot);
    }
    // A wrong token: the source rejects the connection.
    let mut bad = RdmaEndpoint::decode(&endpoint).unwrap();
    bad.token[0] ^= 1;
    let pulled = pull_grant(&dst, &puller, &bad.encode(), &grant, &keys, None).await;
    for p in pulled {
        assert!(
            matches!(&p.result, Err(TransportError::Io { reason, .. }) if reason.contains("rejected")),
            "{:?}",
            p.result
        );
        dst.host().abort(p.slot);
    }
    // And the right endpoint still works after all that.
    let pulled = pull_grant(&dst, &puller, &endpoint, &grant, &keys, None).await;
    assert!(pulled.iter().all(|p| p.result.is_ok()));
    for p in pulled {
        dst.host().abort(p.slot);
    }
}
