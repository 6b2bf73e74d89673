//! Writes a seed corpus for each fuzz target into `corpus/<target>/`: valid inputs the
//! fuzzer mutates from (frames of every type, a real request, certificate and CRL, the shipped
//! config files). Run from `fuzz/`: `cargo run --example seeds`.

use std::fs;
use std::path::Path;

use automerge::{transaction::Transactable, AutoCommit, ObjType, ROOT};
use communesync::node::bundle::BundleHeader;
use communesync::proto::wire::{self, DocChanges, DocHeads, Frame, MissingReason, VERSION};
use communesync_fuzz::material;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    for (i, seed) in seeds.iter().enumerate() {
        fs::write(dir.join(format!("seed-{i:02}")), seed).expect("seed written");
    }
    println!("{target}: {} seeds", seeds.len());
}

fn frames(doc: &[u8]) -> Vec<Frame> {
    let id = "dsp_0011223344556677".to_string();
    vec![
        Frame::Hello {
            version: VERSION,
            feed_seq: 12,
            have_from_you: 3,
            crl_number: 1,
            epoch: 77,
            units_version: 3,
        },
        Frame::Offer {
            docs: vec![
                DocHeads {
                    id: id.clone(),
                    heads: vec![[7; 32]]
                };
                30
            ],
        },
        Frame::OfferEnd {
            upto: 12,
            offered: 30,
        },
        Frame::Want {
            docs: vec![DocHeads {
                id: id.clone(),
                heads: vec![],
            }],
        },
        Frame::WantEnd,
        Frame::Changes {
            docs: vec![
                DocChanges {
                    id: id.clone(),
                    heads: vec![[1; 32]],
                    data: doc.to_vec(),
                    sigs: vec![communesync::proto::ChangeSig::new(&[1; 32], [2; 64])],
                };
                4
            ],
        },
        Frame::Push {
            docs: vec![DocChanges {
                id: id.clone(),
                heads: vec![],
                data: doc.to_vec(),
                sigs: Vec::new(),
            }],
        },
        Frame::ChangesEnd { upto: 12 },
        Frame::Ack { upto: 12 },
        Frame::BlobWant {
            blobs: vec![([3; 32], 0), ([4; 32], 2)],
        },
        Frame::BlobMissing {
            hash: [3; 32],
            reason: MissingReason::Limited,
        },
        Frame::BlobHeader {
            hash: [4; 32],
            size: 600_000,
            chunk_bytes: 262_144,
            first: 0,
            chunk_hashes: vec![[5; 32]; 3],
        },
        Frame::BlobChunk {
            idx: 1,
            compressed: false,
            raw_len: 5,
            data: b"scan!".to_vec().into(),
        },
        Frame::BlobsDone,
        Frame::Crl {
            der: material().crl.der().to_vec(),
        },
        Frame::Refused {
            reason: "revoked".into(),
        },
        Frame::DocRefused {
            id,
            reason: "outside the sender's scope".into(),
        },
        Frame::Reoffer,
        Frame::Status {
            entries: vec![wire::StatusEntry {
                unit: "qn/binhlieu/tinhhuc".into(),
                node_id: "0011223344556677".repeat(2),
                version: "0.1.0".into(),
                as_of_ms: 1_764_000_000_000,
                cert_expires_ms: Some(1_900_000_000_000),
                disk_free_bytes: Some(17 << 30),
                pending_docs: 2,
                pending_bytes: 4096,
                lag_ms: Some(60_000),
                scans_in_flight: 1,
                scans_missing: 1,
                last_error: "connection to qn/binhlieu lost: timed out".into(),
                peers: vec![wire::StatusPeer {
                    unit: "qn/binhlieu".into(),
                    connected: true,
                    last_seen_ms: Some(1_764_000_000_000),
                    pending_docs: 2,
                    pending_bytes: 4096,
                    lag_ms: Some(60_000),
                    last_error: String::new(),
                }],
                sig: [6; 64],
            }],
        },
        Frame::Certs {
            ders: vec![vec![0x30, 0x82, 0x01, 0x00]],
        },
    ]
}

fn main() {
    let m = material();
    let mut doc = AutoCommit::new();
    let visits = doc.put_object(ROOT, "visits", ObjType::List).unwrap();
    for i in 0..40 {
        doc.insert(
            &visits,
            i,
            format!("visit {i} to the commune health station"),
        )
        .unwrap();
    }
    doc.put(ROOT, "unit", "qn/binhlieu/dongtam").unwrap();
    let saved = doc.save();
    let mut later = doc.fork();
    later.put(ROOT, "status", "closed").unwrap();
    let changes = later.save_after(&doc.get_heads());

    let frames = frames(&saved);
    let encoded: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| wire::encode(f, 3)[4..].to_vec())
        .collect();
    write("wire_frames", &encoded);

    let text = b"health station visit, family planning, vaccination; ".repeat(200);
    let mut chunk_seeds = Vec::new();
    for (flags, body) in [
        (3u8, zstd::bulk::compress(&text, 3).unwrap()),
        (2, text.clone()),
    ] {
        let mut seed = vec![flags];
        seed.extend_from_slice(&(text.len() as u32).to_le_bytes());
        seed.extend_from_slice(&body);
        chunk_seeds.push(seed);
    }
    write("scan_chunk", &chunk_seeds);

    write(
        "automerge_bytes",
        &[saved.clone(), changes, doc.save_nocompress()],
    );

    let header = BundleHeader {
        from_node: "0011223344556677".into(),
        from_unit: "qn/binhlieu".into(),
        for_unit: "qn".into(),
        created_at_ms: 1_764_000_000_000,
        since: 0,
        upto: 12,
        docs: 1,
        scans: 0,
        payload_bytes: 0,
        payload_blake3: blake3::hash(b"").to_hex().to_string(),
        signer_cert_pem: m.cert_pem.clone(),
        crl_pem: Some(m.crl.to_pem()),
    };
    let json = serde_json::to_vec(&header).unwrap();
    let mut file = b"CSBUNDLE\x01".to_vec();
    file.extend_from_slice(&(json.len() as u32).to_be_bytes());
    file.extend_from_slice(&json);
    file.extend_from_slice(&64u16.to_be_bytes());
    file.extend_from_slice(&[9; 64]);
    file.extend(wire::encode(&frames[5], 3));
    write("bundle_header", &[file, json]);

    let request_der =
        CertificateSigningRequestDer::from_pem_slice(m.request_pem.as_bytes()).unwrap();
    write(
        "enrol_request",
        &[m.request_pem.clone().into_bytes(), request_der.to_vec()],
    );
    let cert_der = CertificateDer::from_pem_slice(m.cert_pem.as_bytes()).unwrap();
    let ca_der = CertificateDer::from_pem_slice(m.ca_pem.as_bytes()).unwrap();
    write(
        "certificate",
        &[
            cert_der.to_vec(),
            ca_der.to_vec(),
            m.cert_pem.clone().into_bytes(),
        ],
    );
    write("crl", &[m.crl.der().to_vec(), m.crl.to_pem().into_bytes()]);

    let configs: Vec<Vec<u8>> = ["commune", "district", "province", "units-quang-ninh"]
        .iter()
        .map(|name| fs::read(format!("../config/{name}.toml")).expect("a shipped config file"))
        .collect();
    write("config_files", &configs);
}
