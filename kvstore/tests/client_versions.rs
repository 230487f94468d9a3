//! A client newer than its agent (engines upgraded before the agent DaemonSet): the agent refuses
//! a hello of a version it does not know, the client greets it again one version lower, and its
//! calls are what that version has (a hold is a lookup that holds nothing before version 5).

use std::io::{IoSlice, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::Duration;

use kvstore::client::{Client, ClientConfig};
use kvstore::wire::{self, ErrorCode, PROTOCOL_VERSION, Request, Response, Welcome};
use kvstore::{BlockHash, HostArena, HugePages, Namespace, TierLevel};

/// What the older agent saw: each hello's version, and the verbs of the calls after it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Hello(u16),
    Call(&'static str),
}

/// Serves `connections` connections as an agent that speaks versions up to `newest`: a lookup
/// finds every block in the arena, any other call is refused.
fn older_agent(listener: UnixListener, newest: u16, connections: usize, seen: mpsc::Sender<Seen>) {
    let arena = HostArena::create("older-agent", 1 << 20, HugePages::Off).expect("an arena");
    for stream in listener.incoming().take(connections) {
        let stream = stream.expect("a connection");
        let mut body = Vec::new();
        wire::read_frame(&mut &stream, &mut body).expect("a hello");
        let (header, Request::Hello { version, .. }) = Request::decode(&body).expect("a request") else {
            panic!("expected a hello");
        };
        seen.send(Seen::Hello(version)).expect("the test listens");
        let mut out = Vec::new();
        if version > newest {
            Response::Error {
                code: ErrorCode::UnsupportedVersion,
                message: format!("protocol version {version} is not supported"),
            }
            .encode(header.id, &mut out);
            (&stream).write_all(&out).expect("the refusal");
            continue;
        }
        Response::Welcome(Welcome {
            version,
            arena_len: arena.len(),
            max_block_len: 1 << 20,
            instance: 7,
        })
        .encode(header.id, &mut out);
        send_with_fd(&stream, &out, &arena);
        while wire::read_frame(&mut &stream, &mut body).is_ok() {
            let (header, req) = Request::decode(&body).expect("a request");
            seen.send(Seen::Call(req.verb())).expect("the test listens");
            let resp = match req {
                Request::Lookup(_, hashes) => Response::Lookup(vec![TierLevel::Host; hashes.len()]),
                _ => Response::Error {
                    code: ErrorCode::Malformed,
                    message: "unknown to this agent".into(),
                },
            };
            out.clear();
            resp.encode(header.id, &mut out);
            (&stream).write_all(&out).expect("an answer");
        }
    }
}

fn send_with_fd(stream: &UnixStream, frame: &[u8], arena: &HostArena) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [arena.fd()];
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    let sent = sendmsg(
        stream.as_fd(),
        &[IoSlice::new(frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("the welcome");
    (&*stream).write_all(&frame[sent..]).expect("the welcome's rest");
}

#[test]
fn a_client_greets_an_older_agent_in_its_version_and_holds_nothing_there() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("older.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (tx, seen) = mpsc::channel();
    let agent = std::thread::spawn(move || older_agent(listener, 4, 2, tx));

    let client = Client::connect(ClientConfig {
        timeout: Duration::from_secs(10),
        ..ClientConfig::new(&socket)
    })
    .expect("connected one version lower");
    let ns = Namespace::builder("m").build();
    let hashes: Vec<BlockHash> = (0..3).map(BlockHash::from_u64).collect();
    let out = client.hold(&ns, &hashes).expect("a hold");
    assert_eq!((out.tiers, out.held), (vec![TierLevel::Host; 3], 0));
    drop(client);
    agent.join().expect("the agent thread");
    let seen: Vec<Seen> = seen.try_iter().collect();
    assert_eq!(
        seen,
        [
            Seen::Hello(PROTOCOL_VERSION),
            Seen::Hello(4),
            Seen::Call("lookup")
        ]
    );
}
