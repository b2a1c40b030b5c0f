// How the shim's extern "C" functions report a C++ exception to the Rust side: as one line of message in a
// caller-provided buffer and a non-zero return, never by unwinding across the C boundary.

#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

#include <c10/util/Exception.h>

namespace hytrain {

// Copies `what` into `err` (at most `err_len` bytes, always NUL-terminated).
inline void write_error(char* err, size_t err_len, const char* what) {
  if (err != nullptr && err_len > 0) {
    std::strncpy(err, what, err_len - 1);
    err[err_len - 1] = '\0';
  }
}

// Runs `body`; returns 0, or 1 with the exception's message in `err` (without the C++ backtrace that c10's what()
// appends: the message is shown to users as one error line).
template <class Body>
int guarded(char* err, size_t err_len, Body&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_error(err, err_len, e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

}  // namespace hytrain
