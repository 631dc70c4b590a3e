//! Pub/Sub clients: the emulator when `PUBSUB_EMULATOR_HOST` is set, Application Default
//! Credentials (Workload Identity on GKE) otherwise. The SDK does not read that variable
//! itself, so we map it the way the other Google client libraries do.

use google_cloud_pubsub::client::{BasePublisher, Publisher, Subscriber};
use google_cloud_pubsub::model::Message;

use crate::act::notify::RecordSink;
use crate::settle::deadletter::{DeadLetter, DeadLetterSink, PublishError};

/// The ack deadline requested for received messages and for each lease extension (the daemon's
/// stream and `dlq replay`). The SDK extends leases every 3 s, so this leaves ample slack,
/// while a replica that is SIGKILLed or loses its node has its unacked messages redelivered
/// after this long rather than after the minutes a long deadline would cost. 10 s is the
/// smallest deadline Pub/Sub accepts.
pub const LEASE_EXTENSION: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    #[error("creating the Pub/Sub {client} client{target}: {message}")]
    Client {
        client: &'static str,
        target: String,
        message: String,
    },
}

/// `Some("http://host:port")` when the emulator is selected.
pub fn emulator_endpoint() -> Option<String> {
    std::env::var("PUBSUB_EMULATOR_HOST")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.starts_with("http://") || h.starts_with("https://") {
                h
            } else {
                format!("http://{h}")
            }
        })
}

/// `host:port` the subscriber connects to, for the readiness reachability probe.
pub fn endpoint_authority() -> String {
    match emulator_endpoint() {
        Some(e) => e
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string(),
        None => "pubsub.googleapis.com:443".to_string(),
    }
}

fn target() -> String {
    emulator_endpoint()
        .map(|e| format!(" for emulator {e}"))
        .unwrap_or_default()
}

pub async fn subscriber() -> Result<Subscriber, PubSubError> {
    let mut builder = Subscriber::builder();
    if let Some(endpoint) = emulator_endpoint() {
        builder = builder
            .with_endpoint(endpoint)
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    builder.build().await.map_err(|e| PubSubError::Client {
        client: "subscriber",
        target: target(),
        message: e.to_string(),
    })
}

pub async fn publisher(topic: &str) -> Result<Publisher, PubSubError> {
    let mut builder = BasePublisher::builder();
    if let Some(endpoint) = emulator_endpoint() {
        builder = builder
            .with_endpoint(endpoint)
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    let base = builder.build().await.map_err(|e| PubSubError::Client {
        client: "publisher",
        target: target(),
        message: e.to_string(),
    })?;
    Ok(base.publisher(topic.to_string()).build())
}

/// Publishes dead letters to a topic.
pub struct PubSubDeadLetters {
    topic: String,
    publisher: Publisher,
}

impl PubSubDeadLetters {
    pub async fn new(topic: &str) -> Result<Self, PubSubError> {
        Ok(Self {
            topic: topic.to_string(),
            publisher: publisher(topic).await?,
        })
    }
}

impl DeadLetterSink for PubSubDeadLetters {
    async fn publish(&self, letter: DeadLetter) -> Result<String, PublishError> {
        let message = Message::new()
            .set_data(letter.data)
            .set_attributes(letter.attributes);
        self.publisher
            .publish(message)
            .await
            .map_err(|e| PublishError {
                topic: self.topic.clone(),
                message: e.to_string(),
            })
    }
}

/// Publishes outcome records to `--notify-topic`.
pub struct PubSubRecords {
    topic: String,
    publisher: Publisher,
}

impl PubSubRecords {
    pub async fn new(topic: &str) -> Result<Self, PubSubError> {
        Ok(Self {
            topic: topic.to_string(),
            publisher: publisher(topic).await?,
        })
    }
}

impl RecordSink for PubSubRecords {
    async fn send(&self, json: Vec<u8>) -> Result<(), String> {
        self.publisher
            .publish(Message::new().set_data(json))
            .await
            .map(|_| ())
            .map_err(|e| format!("publishing to {}: {e}", self.topic))
    }
}
