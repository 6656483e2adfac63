// The listener's wire format, shared by both transports: the authentication handshake, then
// request/response frames (TCP: WRITE/READ data; both: CONTROL, e.g. the RDMA QP handshake).
// Both ends are this engine on the same architecture family (little-endian x86-64 / aarch64),
// so structs go on the wire as they are in memory.
//
// Every length read from the wire is checked against a limit below before anything is
// allocated or read for it: a peer (or anyone reaching the port) must not be able to make this
// process allocate what it merely announces.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mooncake_vllm::net {

constexpr uint32_t kMagic = 0x4C56434D;  // "MCVL"
// 2: mutual authentication (client nonce, server proof).
constexpr uint16_t kVersion = 2;
// Entries of one WRITE/READ request. The sender cuts parts at 4096 entries; the receiver reads
// entries in chunks as they arrive, so a header announcing many costs nothing until they come.
constexpr uint32_t kMaxEntriesPerMessage = 1u << 16;
// A CONTROL request or reply (an RDMA QP handshake is a few hundred bytes per lane).
constexpr uint64_t kMaxControlBytes = 64 * 1024;
// The error text of a refused request.
constexpr uint32_t kMaxErrorBytes = 4 * 1024;
constexpr size_t kNonceBytes = 32;
constexpr size_t kMacBytes = 32;

// Server -> client, first thing on every connection.
struct Hello {
  uint32_t magic;
  uint16_t version;
  uint16_t auth_required;
  uint8_t server_nonce[kNonceBytes];
};

// Client -> server. With a token: the client's own nonce and
// HMAC-SHA256(token, "client" label || server nonce || client nonce); zeros without one.
struct Auth {
  uint32_t magic;
  uint16_t version;
  uint16_t has_token;
  uint8_t client_nonce[kNonceBytes];
  uint8_t mac[kMacBytes];
};

// Server -> client: status 0 accepted (then, with a token, `mac` proves the server knows it:
// HMAC-SHA256(token, "server" label || server nonce || client nonce)); otherwise refused and
// the server closes the connection.
struct Verdict {
  uint32_t magic;
  int32_t status;
  uint8_t mac[kMacBytes];
};

enum class WireOp : uint8_t { kWrite = 1, kRead = 2, kControl = 3 };

// Client -> server. Followed by `count` Entry records, then (WRITE) the payload of every entry
// in order, or (CONTROL, count 0) `total_bytes` of opaque request.
struct RequestHeader {
  uint32_t magic;
  uint8_t op;
  uint8_t reserved[3];
  uint32_t count;
  uint32_t reserved2;
  uint64_t seq;
  uint64_t total_bytes;
};

struct Entry {
  uint64_t remote;
  uint64_t length;
};

// Server -> client, one per request, in request order. Followed by `error_len` bytes of error
// text, then `payload_bytes` (READ: the data of every entry in order; CONTROL: the reply).
struct ResponseHeader {
  uint32_t magic;
  int32_t status;  // 0 ok
  uint64_t seq;
  uint32_t error_len;
  uint32_t reserved;
  uint64_t payload_bytes;
};

static_assert(sizeof(RequestHeader) == 32, "wire layout");
static_assert(sizeof(ResponseHeader) == 32, "wire layout");
static_assert(sizeof(Entry) == 16, "wire layout");

}  // namespace mooncake_vllm::net
