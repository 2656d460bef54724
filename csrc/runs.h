// COCO run lengths built while pixels are visited in column-major order (the RLE order): shared by the
// CPU post-processing (postprocess.cpp) and the host encoders and bit-mask decoding (encode.cpp).
// Torch-free.
#pragma once

#include <stdint.h>

#include <vector>

namespace mf {

struct RunCounter {
  std::vector<int64_t> counts;
  int64_t run_start = 0;
  bool value = false;  // the first run is the 0s

  // The value changes at column-major index `flat`: close the current run.
  void flip(int64_t flat) {
    counts.push_back(flat - run_start);
    run_start = flat;
    value = !value;
  }
  // The pixel at flat (column-major) index `flat` has value `v`; pixels since the last call repeat the
  // current value.
  void at(bool v, int64_t flat) {
    if (v != value) flip(flat);
  }
  // Close the last run at `total` = H * W pixels.
  void finish(int64_t total) { counts.push_back(total - run_start); }
};

}  // namespace mf
