//! Zero-copy reads into real sockets, pipes and files, full and ranged,
//! compared byte for byte; mmap; range checks. Every case, both drivers.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;

use common::{bytes, id, Fixture};
use imgcache::testing::Store;
use imgcache::{ByteRange, Error};

const SIZE: usize = 8 * 1024 * 1024 + 13;

for_each_driver!(
    send_to_unix_socket_full_and_ranged,
    send_to_tcp_loopback,
    send_to_nonblocking_socket_waits_out_eagain,
    send_to_pipe,
    send_to_file_appends_at_its_position,
    send_range_outside_is_refused,
    mmap_whole_and_range,
    range_reader_reads_exactly_the_range,
    range_reader_refuses_a_file_truncated_behind_its_back,
    empty_image_sends_and_maps_nothing,
);

fn image(kind: Store) -> (Fixture, Vec<u8>) {
    let f = Fixture::new(kind);
    let data = bytes(11, SIZE);
    f.put("img", &data);
    (f, data)
}

/// Reads everything from `r` on a thread.
fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    })
}

fn send_to_unix_socket_full_and_ranged(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    for range in [
        None,
        Some(ByteRange::from(0..1)),
        Some(ByteRange::from(4096..5_000_001)),
        Some(ByteRange::from(SIZE as u64 - 7..SIZE as u64)),
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let reader = drain(b);
        let sent = img.send_to(&a, range).unwrap();
        drop(a);
        let got = reader.join().unwrap();
        let r = range.unwrap_or(ByteRange::full(SIZE as u64));
        assert_eq!(sent, r.len());
        assert!(got == data[r.start as usize..r.end as usize], "{range:?}");
    }
}

fn send_to_tcp_loopback(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let reader = drain(client);
    assert_eq!(img.send_to(&server, None).unwrap(), SIZE as u64);
    drop(server);
    assert!(reader.join().unwrap() == data);
}

fn send_to_nonblocking_socket_waits_out_eagain(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    // 8 MiB does not fit in a socket buffer: the sender meets EAGAIN.
    let reader = drain(b);
    let range = ByteRange::from(100..SIZE as u64);
    assert_eq!(img.send_to(&a, Some(range)).unwrap(), range.len());
    drop(a);
    assert!(reader.join().unwrap() == data[100..]);
}

fn send_to_pipe(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    for range in [None, Some(ByteRange::from(65_535..3_000_000))] {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let reader = drain(File::from(rd));
        let sent = img.send_to(&wr, range).unwrap();
        drop(wr);
        let r = range.unwrap_or(ByteRange::full(SIZE as u64));
        assert_eq!(sent, r.len());
        assert!(reader.join().unwrap() == data[r.start as usize..r.end as usize]);
    }
}

fn send_to_file_appends_at_its_position(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    let mut out = tempfile::tempfile().unwrap();
    out.write_all(b"HEADER").unwrap();
    img.send_to(&out, Some(ByteRange::from(10..1_000_010)))
        .unwrap();
    img.send_to(&out, Some(ByteRange::from(0..=9))).unwrap();
    out.seek(SeekFrom::Start(0)).unwrap();
    let mut got = Vec::new();
    out.read_to_end(&mut got).unwrap();
    let mut want = b"HEADER".to_vec();
    want.extend_from_slice(&data[10..1_000_010]);
    want.extend_from_slice(&data[..10]);
    assert!(got == want);
}

fn send_range_outside_is_refused(kind: Store) {
    let (f, _) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    for bad in [
        ByteRange::from(0..SIZE as u64 + 1),
        ByteRange { start: 10, end: 5 },
        ByteRange::from(u64::MAX - 1..u64::MAX),
    ] {
        match img.send_to(&a, Some(bad)) {
            Err(Error::RangeNotSatisfiable {
                id: i,
                start,
                end,
                size,
            }) => {
                assert_eq!(
                    (i.as_str(), start, end, size),
                    ("img", bad.start, bad.end, SIZE as u64)
                );
            }
            other => panic!("{bad}: {other:?}"),
        }
        assert!(matches!(
            img.mmap(Some(bad)),
            Err(Error::RangeNotSatisfiable { .. })
        ));
        assert!(matches!(
            img.range_reader(Some(bad)),
            Err(Error::RangeNotSatisfiable { .. })
        ));
    }
}

fn mmap_whole_and_range(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    let all = img.mmap(None).unwrap();
    assert!(all[..] == data[..]);
    // An offset that is not page aligned.
    let part = img.mmap(Some(ByteRange::from(12_345..2_000_000))).unwrap();
    assert!(part[..] == data[12_345..2_000_000]);
    // The mapping outlives the image's deletion.
    f.cache.delete_cached_image(&id("img")).unwrap();
    drop(img);
    assert!(all[SIZE - 100..] == data[SIZE - 100..]);
}

fn range_reader_reads_exactly_the_range(kind: Store) {
    let (f, data) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    let mut r = img
        .range_reader(Some(ByteRange::from(1000..=1999)))
        .unwrap();
    assert_eq!(r.remaining(), 1000);
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got, &data[1000..2000]);
    // Two readers at once do not disturb each other or the handle.
    let mut a = img.range_reader(Some(ByteRange::from(0..10))).unwrap();
    let mut b = img.range_reader(Some(ByteRange::from(10..20))).unwrap();
    let (mut x, mut y) = ([0u8; 10], [0u8; 10]);
    b.read_exact(&mut y).unwrap();
    a.read_exact(&mut x).unwrap();
    assert_eq!((&x[..], &y[..]), (&data[..10], &data[10..20]));
}

fn range_reader_refuses_a_file_truncated_behind_its_back(kind: Store) {
    let (f, _) = image(kind);
    let img = f.cache.open_for_read(&id("img")).unwrap().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.path().join("img"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let mut got = Vec::new();
    let err = img
        .range_reader(None)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    let (a, _b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let err = img
        .send_to(&a, Some(ByteRange::from(500..2000)))
        .unwrap_err();
    assert_eq!(
        err.io_kind(),
        Some(std::io::ErrorKind::UnexpectedEof),
        "{err}"
    );
}

fn empty_image_sends_and_maps_nothing(kind: Store) {
    let f = Fixture::new(kind);
    f.put("empty", b"");
    let img = f.cache.open_for_read(&id("empty")).unwrap().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(img.send_to(&a, None).unwrap(), 0);
    assert!(img.mmap(None).unwrap().is_empty());
}
