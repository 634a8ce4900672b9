#include "arm64_harness.h"
#include <stdio.h>
int main(void){ float x[5]={0,-1,-2.5f,-10,-100}; fa_arm64_exp2(x,5); for(int i=0;i<5;i++) printf("%g\n",x[i]); printf("lanes %ld rows %ld\n",(long)fa_arm64_lanes(),(long)fa_arm64_micro_rows()); return 0;}
