//! Reading an HTTP answer's body with a cap. Invariant: at most `cap` bytes of a body are ever held,
//! whatever the server sends or announces; a longer body is cut, and the caller is told.

/// Reads `resp`'s body, keeping at most `cap` bytes. Returns the bytes and whether the body was cut.
pub async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one plain-HTTP answer with a `len`-byte body on loopback; returns its URL.
    async fn serve(len: usize) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 500 Oops\r\ncontent-length: {len}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&vec![b'x'; len]).await;
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn a_huge_answer_is_cut_at_the_cap() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = serve(4 * 1024 * 1024).await;
        let resp = reqwest::get(&url).await.expect("answer");
        let (body, cut) = read_capped(resp, 1000).await.expect("read");
        assert_eq!(body.len(), 1000);
        assert!(cut);
        let url = serve(10).await;
        let resp = reqwest::get(&url).await.expect("answer");
        assert_eq!(
            read_capped(resp, 1000).await.expect("read"),
            (vec![b'x'; 10], false)
        );
    }
}
