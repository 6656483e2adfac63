#include "auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>

#include "mooncake_vllm/types.h"
#include "wire.h"

namespace mooncake_vllm::tcp {

std::array<uint8_t, 32> hmac_sha256(const std::string& key, const uint8_t* data, size_t len) {
  std::array<uint8_t, 32> out{};
  unsigned int out_len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data, len, out.data(),
            &out_len) ||
      out_len != out.size())
    throw TransferError("HMAC-SHA256 failed in libcrypto");
  return out;
}

std::string server_handshake(int fd, const std::string& token, double timeout_s) {
  Hello hello{};
  hello.magic = kMagic;
  hello.version = kVersion;
  hello.auth_required = token.empty() ? 0 : 1;
  if (RAND_bytes(hello.nonce, sizeof(hello.nonce)) != 1) return "no randomness for the nonce";
  set_recv_timeout(fd, timeout_s);
  std::string err = send_bytes(fd, &hello, sizeof(hello));
  Auth auth{};
  if (err.empty()) err = recv_bytes(fd, &auth, sizeof(auth));
  if (!err.empty()) return "handshake: " + err;
  if (auth.magic != kMagic) return "handshake: not a mooncake_vllm engine (bad magic)";
  Verdict verdict{kMagic, 0};
  if (!token.empty()) {
    auto expected = hmac_sha256(token, hello.nonce, sizeof(hello.nonce));
    if (CRYPTO_memcmp(expected.data(), auth.mac, expected.size()) != 0) verdict.status = 1;
  }
  err = send_bytes(fd, &verdict, sizeof(verdict));
  set_recv_timeout(fd, 0);
  if (verdict.status != 0) return "wrong cluster token";
  return err.empty() ? "" : "handshake: " + err;
}

void client_handshake(int fd, const std::string& endpoint, const std::string& token,
                      double timeout_s) {
  set_recv_timeout(fd, timeout_s);
  Hello hello{};
  std::string err = recv_bytes(fd, &hello, sizeof(hello));
  if (!err.empty()) throw TransferError("handshake with " + endpoint + ": " + err);
  if (hello.magic != kMagic || hello.version != kVersion)
    throw TransferError("handshake with " + endpoint +
                        ": not a compatible mooncake_vllm engine (magic/version mismatch)");
  Auth auth{};
  auth.magic = kMagic;
  if (hello.auth_required) {
    if (token.empty())
      throw TransferError("peer " + endpoint + " requires a cluster token and none is configured");
    auto mac = hmac_sha256(token, hello.nonce, sizeof(hello.nonce));
    std::memcpy(auth.mac, mac.data(), mac.size());
  }
  err = send_bytes(fd, &auth, sizeof(auth));
  Verdict verdict{};
  if (err.empty()) err = recv_bytes(fd, &verdict, sizeof(verdict));
  if (!err.empty()) throw TransferError("handshake with " + endpoint + ": " + err);
  if (verdict.status != 0)
    throw TransferError("peer " + endpoint + " refused the connection: wrong cluster token");
  set_recv_timeout(fd, 0);
}

}  // namespace mooncake_vllm::tcp
